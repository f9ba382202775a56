"""Amortized gated posterior q(λ_i | x_i) over composition coefficients.

An inference network reads the frozen base image features ``e_i`` of a sample and outputs the
parameters of every latent site the prior declares (for the default spike-and-slab: per (task,
group) the slab mean μ, the slab log-variance (clamped) and the gate logit ℓ). The ``global``
guide replaces the networks by learned constants: one posterior shared by all samples.

Gated sampling: a component is *kept* when its importance beats a threshold that rises with its
uncertainty,

    keep = 1[ |μ| ≥ τ0 (1 + β tanh(σ / |μ|)) ],

soft in training (a sigmoid of the margin) and hard in evaluation. The rule acts on the gate's
inclusion probability, q(gate = 1) = sigmoid(ℓ) · keep, so a dropped component is deterministically
zero and contributes no sampling variance, and the ELBO accounts for it exactly. Gates are
relaxed-Bernoulli straight-through samples (hard 0/1 forward, relaxed gradient).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.distributions.utils import clamp_probs

from ..errors import ConfigError
from .priors import Prior, Site


def _mlp(d_in: int, hidden: int, d_out: int, init_std: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    for layer in (net[0], net[2]):
        nn.init.normal_(layer.weight, std=init_std)
        nn.init.normal_(layer.bias, std=init_std)
    return net


class ConstantHead(nn.Module):
    """A head that ignores the features: one learned output shared by every sample (global guide)."""

    def __init__(self, d_out: int, init_std: float):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(d_out) * init_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features [N, D]`` -> ``[N, d_out]`` (the same row for every sample)."""
        return self.bias.expand(features.shape[0], -1)


class AmortizedGatedGuide(PyroModule):
    """Amortized posterior over the sites a prior declares, with the uncertainty/importance gate rule.

    One head per site parameter, read from the base features ``e_i`` [N, D]: binary sites get a
    logit (relaxed-Bernoulli straight-through posterior), real sites a loc and log-variance (Normal),
    positive sites a log-scale loc and log-variance (LogNormal).

    Args:
        feature_dim: ``D``, the base image feature size.
        num_tasks, num_groups: ``T`` and ``G`` (coefficient shape per sample).
        prior: the model's prior; its :attr:`~vtvc_pyro.bayes.priors.Prior.sites` decide the guide's sites.
        hidden: hidden width of each head; default ``max(D // 4, T·G)`` as in the authors' code.
        gate_rule: apply the deterministic keep rule (off: plain relaxed-Bernoulli gates).
        amortized: heads are MLPs of the features; ``False`` gives the global guide, one posterior
            shared by every sample (task-level VI in a per-sample model).
        tau0, beta: threshold parameters; ``learn_threshold`` makes them trainable (log-parameterised).
        sharpness: slope of the soft keep rule in training.
        init_std: std of the heads' initial weights and biases.
        slab_mean_init, gate_logit_init, slab_logvar_init: added to the initial output biases of the
            ``slab`` loc head (real slabs only; other sites start at their declared ``init``), of every
            gate-logit head and of every log-variance head.
        logvar_min, logvar_max: clamp of the log-variances.
    """

    def __init__(
        self,
        feature_dim: int,
        num_tasks: int,
        num_groups: int,
        prior: Prior,
        hidden: int | None = None,
        gate_rule: bool = True,
        amortized: bool = True,
        tau0: float = 0.05,
        beta: float = 1.0,
        learn_threshold: bool = True,
        sharpness: float = 20.0,
        init_std: float = 0.01,
        slab_mean_init: float = 0.0,
        gate_logit_init: float = 0.0,
        slab_logvar_init: float = -4.0,
        logvar_min: float = -8.0,
        logvar_max: float = 2.0,
    ):
        super().__init__()
        if tau0 <= 0 or beta < 0:
            raise ConfigError(f"gate threshold needs tau0 > 0 and beta >= 0, got tau0={tau0}, beta={beta}")
        self.num_tasks, self.num_groups = num_tasks, num_groups
        self.prior = prior
        self.has_gate = prior.has_gate
        self.gate_rule = gate_rule and prior.has_gate
        self.amortized = amortized
        hidden = hidden or max(feature_dim // 4, num_tasks * num_groups)

        def head(site: Site, init: float) -> nn.Module:
            size = max(1, math.prod(site.dims(num_tasks, num_groups)))
            net = _mlp(feature_dim, hidden, size, init_std) if amortized else ConstantHead(size, init_std)
            with torch.no_grad():  # the initial posterior: the output bias sets its centre
                (net[2].bias if amortized else net.bias).add_(init)
            return net

        # continuous sites first, then gates: with the default prior this draws the initial weights in
        # the same order as the original three-head guide (mean, log-variance, logit)
        self.heads = nn.ModuleDict()
        for site in (s for s in prior.sites if s.support != "binary"):
            loc_init = slab_mean_init if (site.name == "slab" and site.support == "real") else site.init
            self.heads[f"{site.name}_loc"] = head(site, loc_init)
            self.heads[f"{site.name}_logvar"] = head(site, slab_logvar_init)
        for site in (s for s in prior.sites if s.support == "binary"):
            self.heads[f"{site.name}_logit"] = head(site, gate_logit_init)
        log_tau0 = torch.tensor(math.log(tau0))
        log_beta = torch.tensor(math.log(max(beta, 1e-8)))
        if learn_threshold:
            self.log_tau0, self.log_beta = nn.Parameter(log_tau0), nn.Parameter(log_beta)
        else:
            self.register_buffer("log_tau0", log_tau0)
            self.register_buffer("log_beta", log_beta)
        self.sharpness = sharpness
        self.logvar_min, self.logvar_max = logvar_min, logvar_max

    def posterior_params(self, features: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Per-sample posterior parameters of every site, each ``[N, *site shape]``.

        Returns:
            site name -> parameters: ``loc`` and ``scale`` for continuous sites (log scale for
            positive ones); for the gate ``logit``, ``keep`` (soft in training, hard in eval) and
            ``probs`` = sigmoid(logit) · keep.
        """
        n = features.shape[0]
        out = {}
        for site in self.prior.sites:
            shape = (n, *site.dims(self.num_tasks, self.num_groups))
            if site.support == "binary":
                out[site.name] = {"logit": self.heads[f"{site.name}_logit"](features).reshape(shape)}
                continue
            loc = self.heads[f"{site.name}_loc"](features).reshape(shape)
            logvar = self.heads[f"{site.name}_logvar"](features).reshape(shape).clamp(self.logvar_min, self.logvar_max)
            out[site.name] = {"loc": loc, "scale": torch.exp(0.5 * logvar)}
        if self.has_gate:
            gate = out[self.prior.gate_site]
            keep = self._gate_keep(out, gate["logit"].shape) if self.gate_rule else torch.ones_like(gate["logit"])
            gate.update(keep=keep, probs=clamp_probs(torch.sigmoid(gate["logit"]) * keep))
        return out

    def _gate_keep(self, params: dict, gate_shape: torch.Size) -> torch.Tensor:
        """The keep rule on the value site's point estimate and spread, reduced to the gate's shape."""
        value = params[self.prior.value_site]
        point, spread = value["loc"], value["scale"]
        if self._site(self.prior.value_site).support == "positive":  # LogNormal: median and its spread
            point = point.exp()
            spread = point * spread
        while point.dim() > len(gate_shape):  # e.g. one gate per task: mean over its groups
            point, spread = point.abs().mean(-1), spread.mean(-1)
        return self.keep(point, spread)

    def _site(self, name: str) -> Site:
        return next(s for s in self.prior.sites if s.name == name)

    def keep(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Keep weight of each component: importance |μ| against τ0 (1 + β tanh(σ/|μ|))."""
        importance = loc.abs()
        uncertainty = torch.tanh(scale / (importance + 1e-8))
        threshold = self.log_tau0.exp() * (1 + self.log_beta.exp() * uncertainty)
        if self.training:
            return torch.sigmoid(self.sharpness * (importance - threshold))
        return (importance >= threshold).to(loc.dtype)

    def _posterior(self, site: Site, p: dict, temperature: float, values: dict) -> dist.Distribution:
        """q of ``site`` given the values drawn for the sites before it (the prior may condition on them)."""
        if site.support == "binary":
            q = dist.RelaxedBernoulliStraightThrough(p["probs"].new_tensor(temperature), probs=p["probs"])
        elif site.support == "positive":
            q = dist.LogNormal(p["loc"], p["scale"])
        else:
            q = dist.Normal(p["loc"], p["scale"])
        return self.prior.condition_posterior(site.name, q, values)

    def mean_coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """Deterministic coefficients ``[N, T, G]``: gates at q(gate) (eval: hard keep), real sites at
        their (conditional) mean, positive sites at their median, combined by the prior."""
        params = self.posterior_params(features)
        values = {}
        for site in self.prior.sites:
            p = params[site.name]
            if site.support == "binary":
                values[site.name] = p["probs"]
            elif site.support == "positive":
                values[site.name] = p["loc"].exp()
            else:
                # no argument checks: a diverged fit should evaluate to NaN, not raise (see fit_svi)
                with pyro.validation_enabled(False):
                    values[site.name] = self._posterior(site, p, 1.0, values).mean
        return self.prior.combine(values)

    def forward(self, images, features, labels=None, num_data=None, kl_weight=1.0, temperature=0.1):
        """Pyro guide; mirrors :meth:`VTVCModel.forward` site by site (the prior's sites, in order)."""
        params = self.posterior_params(features)
        num_data = num_data or features.shape[0]
        values = {}
        with pyro.plate("data", num_data, subsample=torch.arange(features.shape[0], device=features.device), dim=-1):
            with pyro.poutine.scale(scale=kl_weight):
                for site in self.prior.sites:
                    p = params[site.name]
                    q = self._posterior(site, p, temperature, values)
                    q = q.to_event(len(site.dims(self.num_tasks, self.num_groups)))
                    analytic = site.support == "binary" and self.prior.analytic_kl
                    with pyro.poutine.mask(mask=not analytic):
                        values[site.name] = pyro.sample(site.name, q)
                    if analytic:
                        # a guide factor adds to log q, so +KL here subtracts the exact gate KL from the ELBO
                        pyro.factor(f"{site.name}_kl", self.prior.gate_kl(p["probs"]), has_rsample=True)
        return params

    @torch.no_grad()
    def sample_coefficients(self, features: torch.Tensor, num_samples: int, temperature: float = 0.01):
        """Posterior draws outside Pyro (fast predictive).

        Returns:
            ``lam [S, N, T, G]`` and ``gate [S, N, T, G]`` (ones without a gate site).
        """
        params = self.posterior_params(features)
        # rsample, not sample: only rsample quantizes the relaxed gate draw to exact 0/1.
        values = {}
        for site in self.prior.sites:
            q = self._posterior(site, params[site.name], temperature, values)
            conditional = len(q.batch_shape) > 1 + len(site.dims(self.num_tasks, self.num_groups))  # has the S dim
            values[site.name] = q.rsample() if conditional else q.rsample((num_samples,))
        return self.prior.combine(values), self.prior.inclusion(values)


GUIDES = {
    "amortized_gated": dict(gate_rule=True, amortized=True),
    "amortized": dict(gate_rule=False, amortized=True),
    "global": dict(gate_rule=True, amortized=False),
}


def make_guide(name: str, **kwargs) -> AmortizedGatedGuide:
    """Build a registered guide by name."""
    if name not in GUIDES:
        raise ConfigError(f"unknown guide {name!r}: choose one of {', '.join(GUIDES)}")
    return AmortizedGatedGuide(**{**kwargs, **GUIDES[name]})
