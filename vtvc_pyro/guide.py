"""Amortized gated posterior q(λ_i | x_i) over composition coefficients.

An inference network reads the frozen base image features ``e_i`` of a sample and outputs, per
(task, group), the slab mean μ, the slab log-variance (clamped) and the gate logit ℓ.

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
from torch.distributions.utils import clamp_probs
from pyro.nn import PyroModule
from torch import nn

from .errors import ConfigError
from .priors import Prior


def _mlp(d_in: int, hidden: int, d_out: int, init_std: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    for layer in (net[0], net[2]):
        nn.init.normal_(layer.weight, std=init_std)
        nn.init.normal_(layer.bias, std=init_std)
    return net


class AmortizedGatedGuide(PyroModule):
    """Amortized spike-and-slab posterior with the uncertainty/importance gate rule.

    Args:
        feature_dim: ``D``, the base image feature size.
        num_tasks, num_groups: ``T`` and ``G`` (coefficient shape per sample).
        prior: the model's prior (decides whether a ``gate`` site exists).
        hidden: hidden width of each head; default ``max(D // 4, T·G)`` as in the authors' code.
        gate_rule: apply the deterministic keep rule (off: plain relaxed-Bernoulli gates).
        tau0, beta: threshold parameters; ``learn_threshold`` makes them trainable (log-parameterised).
        sharpness: slope of the soft keep rule in training.
        init_std: std of the heads' initial weights and biases.
        slab_mean_init, gate_logit_init, slab_logvar_init: added to the initial output biases of the
            mean, gate-logit and log-variance heads (the posterior every sample starts from).
        logvar_min, logvar_max: clamp of the slab log-variance.
    """

    def __init__(
        self,
        feature_dim: int,
        num_tasks: int,
        num_groups: int,
        prior: Prior,
        hidden: int | None = None,
        gate_rule: bool = True,
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
        out = num_tasks * num_groups
        hidden = hidden or max(feature_dim // 4, out)
        self.mean_net = _mlp(feature_dim, hidden, out, init_std)
        self.logvar_net = _mlp(feature_dim, hidden, out, init_std)
        self.logit_net = _mlp(feature_dim, hidden, out, init_std) if self.has_gate else None
        with torch.no_grad():  # initial posterior: the heads' output biases set its centre
            self.mean_net[2].bias.add_(slab_mean_init)
            self.logvar_net[2].bias.add_(slab_logvar_init)
            if self.logit_net is not None:
                self.logit_net[2].bias.add_(gate_logit_init)
        log_tau0 = torch.tensor(math.log(tau0))
        log_beta = torch.tensor(math.log(max(beta, 1e-8)))
        if learn_threshold:
            self.log_tau0, self.log_beta = nn.Parameter(log_tau0), nn.Parameter(log_beta)
        else:
            self.register_buffer("log_tau0", log_tau0)
            self.register_buffer("log_beta", log_beta)
        self.sharpness = sharpness
        self.logvar_min, self.logvar_max = logvar_min, logvar_max

    def posterior_params(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample posterior parameters, each ``[N, T, G]``.

        Returns:
            ``loc``, ``scale`` (slab), and with a gate ``logit``, ``keep`` (soft in training, hard in
            eval) and ``gate_probs`` = sigmoid(logit) · keep.
        """
        shape = (features.shape[0], self.num_tasks, self.num_groups)
        loc = self.mean_net(features).reshape(shape)
        logvar = self.logvar_net(features).reshape(shape).clamp(self.logvar_min, self.logvar_max)
        out = {"loc": loc, "scale": torch.exp(0.5 * logvar)}
        if self.has_gate:
            logit = self.logit_net(features).reshape(shape)
            keep = self.keep(loc, out["scale"]) if self.gate_rule else torch.ones_like(loc)
            out.update(logit=logit, keep=keep, gate_probs=clamp_probs(torch.sigmoid(logit) * keep))
        return out

    def keep(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Keep weight of each component: importance |μ| against τ0 (1 + β tanh(σ/|μ|))."""
        importance = loc.abs()
        uncertainty = torch.tanh(scale / (importance + 1e-8))
        threshold = self.log_tau0.exp() * (1 + self.log_beta.exp() * uncertainty)
        if self.training:
            return torch.sigmoid(self.sharpness * (importance - threshold))
        return (importance >= threshold).to(loc.dtype)

    def mean_coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """Deterministic gated mean E_q[λ] = q(gate) · μ (eval: hard keep): ``[N, T, G]``."""
        p = self.posterior_params(features)
        return p["loc"] * p["gate_probs"] if self.has_gate else p["loc"]

    def forward(self, images, features, labels=None, num_data=None, kl_weight=1.0, temperature=0.1):
        """Pyro guide; mirrors :meth:`VTVCModel.forward` site by site (``gate``, ``slab``)."""
        p = self.posterior_params(features)
        num_data = num_data or features.shape[0]
        with pyro.plate("data", num_data, subsample=torch.arange(features.shape[0], device=features.device), dim=-1):
            with pyro.poutine.scale(scale=kl_weight):
                if self.has_gate:
                    with pyro.poutine.mask(mask=not self.prior.analytic_kl):
                        pyro.sample(
                            "gate",
                            dist.RelaxedBernoulliStraightThrough(features.new_tensor(temperature), probs=p["gate_probs"])
                            .to_event(2),
                        )
                    if self.prior.analytic_kl:
                        # a guide factor adds to log q, so +KL here subtracts the exact gate KL from the ELBO
                        pyro.factor("gate_kl", self.prior.gate_kl(p["gate_probs"]), has_rsample=True)
                pyro.sample("slab", dist.Normal(p["loc"], p["scale"]).to_event(2))
        return p

    @torch.no_grad()
    def sample_coefficients(self, features: torch.Tensor, num_samples: int, temperature: float = 0.01):
        """Posterior draws outside Pyro (fast predictive).

        Returns:
            ``lam [S, N, T, G]`` and ``gate [S, N, T, G]`` (ones without a gate site).
        """
        p = self.posterior_params(features)
        slab = dist.Normal(p["loc"], p["scale"]).sample((num_samples,))
        if not self.has_gate:
            return slab, torch.ones_like(slab)
        # rsample, not sample: only rsample quantizes the relaxed draw to exact 0/1.
        gate = dist.RelaxedBernoulliStraightThrough(features.new_tensor(temperature), probs=p["gate_probs"]).rsample((num_samples,))
        return gate * slab, gate


GUIDES = {
    "amortized_gated": dict(gate_rule=True),
    "amortized": dict(gate_rule=False),
}


def make_guide(name: str, **kwargs) -> AmortizedGatedGuide:
    """Build a registered guide by name."""
    if name not in GUIDES:
        raise ConfigError(f"unknown guide {name!r}: choose one of {', '.join(GUIDES)}")
    return AmortizedGatedGuide(**{**kwargs, **GUIDES[name]})
