"""Amortized gated posterior q(λ_i | x_i) over per-sample composition coefficients (the ``flat`` model).

An inference network reads the frozen base image features ``e_i`` of a sample and outputs the
parameters of every latent site the prior declares (for the default spike-and-slab: per (task,
group) the slab mean μ, the slab log-variance (clamped) and the gate logit ℓ).

Gated sampling (:func:`keep_rule`): a component is *reliable* when its importance beats a
threshold that rises with its uncertainty,

    reliable = 1[ |μ| · n_tg ≥ τ0 (1 + β tanh(σ / |μ|)) ],

where ``n_tg`` is the size of the component's task vector relative to the other tasks' vectors of
the same block (see :meth:`~vtvc_pyro.compose.engine.Composer.component_scales`), so that τ0 means the same
for a large and a small task vector. What the rule does is the guide's ``gating`` setting:

- ``expect`` (the same rule in training and prediction; task addition's default): importance is the size of the
  expected coefficient, |γ μ| · n_tg against τ0 (1 + β tanh(σ / |μ|)) with γ = sigmoid(ℓ) (a
  gate that is mostly off is not important). A reliable component uses its gate at its
  expectation γ instead of a 0/1 draw, λ = γ · s with the slab s still drawn, in training and in
  every prediction draw. An unreliable one draws its gate in training (so it keeps a likelihood
  gradient and can become reliable) and is dropped at prediction, exactly zero. Why: the gate draw
  is the main source of the ELBO gradient's variance (a hard 0/1 switch of a whole task-vector
  block), and for an important component whose slab is far from zero relative to its spread the
  draw carries little information the expectation does not. Replacing z by E[z] is the
  deterministic, mean-field approximation E_z f(z s) ≈ f(E[z] s) of the likelihood term for those
  components (exact when γ is 0 or 1; the KL stays the exact spike-and-slab KL), so the loss is
  the ELBO of the gated estimator, not of all-sampled gates. γ keeps a pathwise gradient through
  λ = γ s (a naive "held at 1" would leave the logit with the KL's gradient alone), and the rule
  is a decision made on detached parameters, so it sends no gradient itself. The one-pass
  prediction E[λ] = γ μ is the value a reliable component takes in every draw.
- ``drop`` (the transfer default, and runs that predate ``expect``): training draws every gate; at
  prediction a component that fails the rule is dropped, q(gate = 1) = 0. Where images are few the
  draws' noise regularises: held gates lost on val with 4 and 16 images per class. (Applied in training as a soft sigmoid, as the
  authors' development code does, it multiplies q(gate = 1) by a value below 1 and so *raises* the
  gate's variance.)

The expected gate needs a gate that scales its slab (λ = ± gate · slab, the prior's
``gate_scales_slab``) and whose KL is in closed form (the prior's ``kl_sites``: a gate held at a
value has no Monte Carlo density); the guide refuses ``expect`` otherwise. τ0 and β are
hyperparameters chosen on val.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import clamp_probs

from ..errors import ConfigError
from .priors import Prior, Site


def keep_rule(loc: torch.Tensor, scale: torch.Tensor, component_scale: torch.Tensor, tau0: float,
              beta: float) -> torch.Tensor:
    """Hard keep weight (0/1) of each component, shapes broadcast: importance ``|loc| · component_scale``
    against the threshold ``tau0 (1 + beta tanh(scale / |loc|))``."""
    importance = loc.abs() * component_scale
    uncertainty = torch.tanh(scale / (loc.abs() + 1e-8))
    return (importance >= tau0 * (1 + beta * uncertainty)).to(loc.dtype)


GATINGS = ("expect", "drop")
"""What the keep rule does: hold reliable gates at their expectation (training and prediction) or
drop unreliable components at prediction only (see the module docstring)."""


def gate_site_probs(prior: Prior, params: dict, component_scale: torch.Tensor, tau0: float, beta: float,
                    gating: str | None, predicting: bool) -> None:
    """Add ``reliable``, ``keep``, ``fixed`` and ``probs`` to the gate's parameters in ``params``, in place.

    The keep rule acts on the value site's point estimate and spread (median and its spread for a
    positive site, detached: the rule is a decision, not a path for gradients), reduced to the
    gate's shape (one gate per task: mean over its groups), and with ``expect`` scaled by
    q(gate = 1), so that importance is the expected coefficient's size. ``reliable`` is its result
    (ones where it does not act: ``gating`` ``None``, or ``drop`` in training). ``keep`` drops the
    unreliable components at prediction (zeros there; ones in training), ``probs`` =
    sigmoid(logit) · keep, and ``fixed`` marks the gates held at their expectation (``expect``,
    training and prediction; zeros otherwise). Shapes: any leading dims (``[N]``, ``[K]`` or none).
    """
    gate = params[prior.gate_site]
    ones = torch.ones_like(gate["logit"])
    reliable = ones
    if gating == "expect" or (gating == "drop" and predicting):
        value = params[prior.value_site]
        point, spread, scale = value["loc"].detach(), value["scale"].detach(), component_scale
        if next(s for s in prior.sites if s.name == prior.value_site).support == "positive":
            point = point.exp()
            spread = point * spread
        while point.dim() > gate["logit"].dim():
            point, spread, scale = point.abs().mean(-1), spread.mean(-1), scale.mean(-1)
        if gating == "expect":  # importance of the expected coefficient γ·μ: a gate that is mostly off is not held
            inclusion = torch.sigmoid(gate["logit"].detach())
            point, spread = point * inclusion, spread * inclusion
        reliable = keep_rule(point, spread, scale, tau0, beta)
    keep = reliable if predicting else ones
    held = gating == "expect" and prior.gate_scales_slab and prior.gate_site in prior.kl_sites
    fixed = reliable if held else torch.zeros_like(ones)
    gate.update(keep=keep, fixed=fixed, reliable=reliable, probs=clamp_probs(torch.sigmoid(gate["logit"]) * keep))


class ExpectedGate(dist.TorchDistribution):
    """A gate that is held at its expectation where ``fixed`` is 1 and drawn elsewhere.

    The draw is the relaxed-Bernoulli straight-through draw (exact 0/1 forward, relaxed gradient);
    a held gate is ``probs`` itself, so its value carries the pathwise gradient of ``probs``. Used
    only for gates whose KL is added in closed form (masked sites): :meth:`log_prob` scores the
    drawn gates and gives 0 to the held ones (a point mass).

    Args:
        temperature: the relaxation's temperature (scalar tensor).
        probs: ``[*B]`` q(gate = 1); fixed: ``[*B]`` 0/1.
    """

    arg_constraints = {"probs": constraints.unit_interval}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, temperature: torch.Tensor, probs: torch.Tensor, fixed: torch.Tensor, validate_args=None):
        self.temperature, self.probs = temperature, probs
        self.fixed = torch.broadcast_to(fixed, probs.shape)
        self.draw = dist.RelaxedBernoulliStraightThrough(temperature, probs=probs)
        super().__init__(probs.shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return ExpectedGate(self.temperature, self.probs.expand(shape), self.fixed.expand(shape))

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        drawn = self.draw.rsample(sample_shape)
        return torch.where(self.fixed.bool(), self.probs.expand_as(drawn), drawn)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return torch.where(self.fixed.bool(), torch.zeros_like(value), self.draw.log_prob(value))


def site_posterior(prior: Prior, site: Site, p: dict, temperature: float, values: dict) -> dist.Distribution:
    """q of ``site`` from its parameters ``p``, given the values drawn for the sites before it."""
    if site.support == "binary":
        q = (ExpectedGate(p["probs"].new_tensor(temperature), p["probs"], p["fixed"]) if "fixed" in p
             else dist.RelaxedBernoulliStraightThrough(p["probs"].new_tensor(temperature), probs=p["probs"]))
    elif site.support == "positive":
        q = dist.LogNormal(p["loc"], p["scale"])
    else:
        q = dist.Normal(p["loc"], p["scale"])
    return prior.condition_posterior(site.name, q, values)


def point_values(prior: Prior, params: dict) -> dict[str, torch.Tensor]:
    """Deterministic site values: gates at q(gate = 1), real sites at their (conditional) mean,
    positive sites at their median."""
    values = {}
    for site in prior.sites:
        p = params[site.name]
        if site.support == "binary":
            values[site.name] = p["probs"]
        elif site.support == "positive":
            values[site.name] = p["loc"].exp()
        else:
            # no argument checks: a diverged fit should evaluate to NaN, not raise (see fit_svi)
            with pyro.validation_enabled(False):
                values[site.name] = site_posterior(prior, site, p, 1.0, values).mean
    return values


def sample_sites(prior: Prior, params: dict, num_samples: int, temperature: float) -> dict[str, torch.Tensor]:
    """``num_samples`` draws of every site (outside Pyro), each ``[S, *params shape]``.

    ``rsample``, not ``sample``: only ``rsample`` quantizes the relaxed gate draw to exact 0/1.
    """
    values = {}
    for site in prior.sites:
        q = site_posterior(prior, site, params[site.name], temperature, values)
        conditional = len(q.batch_shape) > len(params[site.name]["probs" if site.support == "binary" else "loc"].shape)
        values[site.name] = q.rsample() if conditional else q.rsample((num_samples,))
    return values


def gate_logit_start(prior: Prior, gate_logit_init: float | None) -> float:
    """The gates' initial logit: ``gate_logit_init``, or the prior's own inclusion logit when it is ``None``."""
    if gate_logit_init is not None:
        return float(gate_logit_init)
    pi = getattr(prior, "pi", 0.5)
    return math.log(pi / (1 - pi))


def mlp_head(d_in: int, hidden: int, d_out: int, init_std: float) -> nn.Sequential:
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


@dataclass(frozen=True)
class GuideSettings:
    """What the flat and the hierarchical guides share: width, keep rule and initial posterior.

    Attributes:
        hidden: hidden width of the networks (default: ``max(D // 4, T·G)`` for the flat guide's
            heads, as in the authors' code; ``max(D // 4, T)`` for the hierarchical router).
        gate_rule: apply the deterministic keep rule (:func:`keep_rule`).
        gating: what the rule does (:data:`GATINGS`): ``expect`` holds reliable gates at their
            expectation in training and prediction; ``drop`` draws every gate in training and drops
            unreliable components at prediction (the module docstring says when each wins).
        tau0, beta: the keep rule's threshold parameters.
        init_std: std of the networks' initial weights and biases.
        slab_mean_init, gate_logit_init, slab_logvar_init: the initial posterior: added to the output
            biases (flat) or the global constants (hierarchical) of the ``slab`` mean (real slabs
            only; other sites start at their declared ``init``), of every gate logit (``None``: the
            prior's inclusion logit) and of every log-variance.
        logvar_min, logvar_max: clamp of the log-variances.
    """

    hidden: int | None = None
    gate_rule: bool = True
    gating: str = "drop"
    tau0: float = 0.05
    beta: float = 1.0
    init_std: float = 0.01
    slab_mean_init: float = 0.0
    gate_logit_init: float | None = None
    slab_logvar_init: float = -4.0
    logvar_min: float = -8.0
    logvar_max: float = 2.0

    @classmethod
    def of(cls, settings: GuideSettings | None = None, **overrides) -> GuideSettings:
        """``settings`` (default: the defaults) with ``overrides`` by field name.

        Raises:
            ConfigError: an override names no field.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown guide setting(s) {', '.join(unknown)}: choose from {', '.join(sorted(names))}")
        return replace(settings or cls(), **overrides)

    @classmethod
    def from_config(cls, cfg) -> GuideSettings:
        """The fields of ``cfg`` (e.g. a :class:`~vtvc_pyro.config.FitConfig`) that name a setting."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


class GatedGuide(PyroModule):
    """What both guides hold: the coefficient shape, the prior, and the keep rule's settings.

    Subclasses build their networks or constants in ``__init__`` and implement
    ``sample_posterior`` and ``mean_coefficients``.
    """

    def __init__(self, num_tasks: int, num_groups: int, prior: Prior, settings: GuideSettings):
        super().__init__()
        if settings.tau0 <= 0 or settings.beta < 0:
            raise ConfigError(f"gate threshold needs tau0 > 0 and beta >= 0, got tau0={settings.tau0}, "
                              f"beta={settings.beta}")
        if settings.gating not in GATINGS:
            raise ConfigError(f"unknown gating {settings.gating!r}: use {' or '.join(GATINGS)}")
        if (settings.gating == "expect" and settings.gate_rule and prior.has_gate
                and not (prior.gate_scales_slab and prior.gate_site in prior.kl_sites)):
            raise ConfigError(f"--gating expect holds gates at their expectation, which needs a gate that scales its "
                              f"slab with a closed-form KL; the {prior.name} prior's does not: use --gating drop")
        self.settings = settings
        self.num_tasks, self.num_groups = num_tasks, num_groups
        self.prior = prior
        self.has_gate = prior.has_gate
        self.gate_rule = settings.gate_rule and prior.has_gate
        self.tau0, self.beta = float(settings.tau0), float(settings.beta)
        self.logvar_min, self.logvar_max = settings.logvar_min, settings.logvar_max

    def gate_params(self, params: dict) -> None:
        """Add the gate's ``reliable``, ``keep``, ``fixed`` and ``probs`` to ``params`` in place
        (:func:`gate_site_probs`; prediction in eval mode)."""
        if self.has_gate:
            gate_site_probs(self.prior, params, self.component_scale, self.tau0, self.beta,
                            self.settings.gating if self.gate_rule else None, predicting=not self.training)

    def _register_component_scale(self, component_scale: torch.Tensor | None) -> None:
        scale = torch.ones(self.num_tasks, self.num_groups) if component_scale is None else component_scale.float()
        self.register_buffer("component_scale", scale)


class AmortizedGatedGuide(GatedGuide):
    """Amortized posterior over the sites a prior declares, with the uncertainty/importance gate rule.

    One head per site parameter, read from the base features ``e_i`` [N, D]: binary sites get a
    logit (relaxed-Bernoulli straight-through posterior), real sites a loc and log-variance (Normal),
    positive sites a log-scale loc and log-variance (LogNormal).

    Args:
        feature_dim: ``D``, the base image feature size.
        num_tasks, num_groups: ``T`` and ``G`` (coefficient shape per sample).
        prior: the model's prior; its :attr:`~vtvc_pyro.bayes.priors.Prior.sites` decide the guide's sites.
        settings: width, keep rule and initial posterior (:class:`GuideSettings`).
        amortized: heads are MLPs of the features; ``False`` gives one posterior shared by every
            sample *inside* the data plate (each image still draws its own λ; for task-level VI use
            the hierarchical model's ``global`` guide).
        component_scale: ``[T, G]`` relative task-vector size of each component (default: ones).
        overrides: :class:`GuideSettings` fields by name (``hidden=64``), applied over ``settings``.
    """

    def __init__(self, feature_dim: int, num_tasks: int, num_groups: int, prior: Prior,
                 settings: GuideSettings | None = None, amortized: bool = True,
                 component_scale: torch.Tensor | None = None, **overrides):
        settings = GuideSettings.of(settings, **overrides)
        super().__init__(num_tasks, num_groups, prior, settings)
        self.amortized = amortized
        hidden = settings.hidden or max(feature_dim // 4, num_tasks * num_groups)

        def head(site: Site, init: float) -> nn.Module:
            size = max(1, math.prod(site.dims(num_tasks, num_groups)))
            net = (mlp_head(feature_dim, hidden, size, settings.init_std) if amortized
                   else ConstantHead(size, settings.init_std))
            with torch.no_grad():  # the initial posterior: the output bias sets its centre
                (net[2].bias if amortized else net.bias).add_(init)
            return net

        # continuous sites first, then gates: with the default prior this draws the initial weights in
        # the same order as the original three-head guide (mean, log-variance, logit)
        self.heads = nn.ModuleDict()
        for site in (s for s in prior.sites if s.support != "binary"):
            loc_init = settings.slab_mean_init if (site.name == "slab" and site.support == "real") else site.init
            self.heads[f"{site.name}_loc"] = head(site, loc_init)
            self.heads[f"{site.name}_logvar"] = head(site, settings.slab_logvar_init)
        for site in (s for s in prior.sites if s.support == "binary"):
            self.heads[f"{site.name}_logit"] = head(site, gate_logit_start(prior, settings.gate_logit_init))
        self._register_component_scale(component_scale)

    def posterior_params(self, features: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Per-sample posterior parameters of every site, each ``[N, *site shape]``.

        Returns:
            site name -> parameters: ``loc`` and ``scale`` for continuous sites (log scale for
            positive ones); for the gate ``logit``, ``reliable``, ``keep``, ``fixed`` and ``probs``
            (:func:`gate_site_probs`).
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
        self.gate_params(out)
        return out

    def mean_coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """Deterministic coefficients ``[N, T, G]``: gates at q(gate) (eval: hard keep), real sites at
        their (conditional) mean, positive sites at their median, combined by the prior."""
        return self.prior.combine(point_values(self.prior, self.posterior_params(features)))

    def forward(self, images, features, labels=None, num_data=None, kl_weight=1.0, temperature=0.1,
                local_kl_weight=None):
        """Pyro guide; mirrors :meth:`VTVCModel.forward` site by site (the prior's sites, in order)."""
        params = self.posterior_params(features)
        num_data = num_data or features.shape[0]
        values = {}
        with pyro.plate("data", num_data, subsample=torch.arange(features.shape[0], device=features.device), dim=-1):
            with pyro.poutine.scale(scale=kl_weight if local_kl_weight is None else local_kl_weight):
                for site in self.prior.sites:
                    q = site_posterior(self.prior, site, params[site.name], temperature, values)
                    q = q.to_event(len(site.dims(self.num_tasks, self.num_groups)))
                    with pyro.poutine.mask(mask=site.name not in self.prior.kl_sites):
                        values[site.name] = pyro.sample(site.name, q)
                if self.prior.kl_sites:
                    # a guide factor adds to log q, so +KL here subtracts the exact KL from the ELBO
                    pyro.factor("kl", self.prior.kl(params), has_rsample=True)
        return params

    @torch.no_grad()
    def sample_posterior(self, features: torch.Tensor, num_samples: int, temperature: float = 0.01,
                         shared: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Posterior draws outside Pyro, every site by name.

        Returns:
            ``(local, shared)``: ``local`` holds ``lam`` and ``inclusion`` ``[S, N, T, G]`` and every
            prior site ``[S, N, *site dims]``; ``shared`` (global sites) is empty: every latent of
            the flat model is per image. ``shared`` is accepted for the signature of
            :meth:`HierarchicalGuide.sample_posterior` and ignored.
        """
        values = sample_sites(self.prior, self.posterior_params(features), num_samples, temperature)
        return {**values, "lam": self.prior.combine(values), "inclusion": self.prior.inclusion(values)}, {}

    def sample_coefficients(self, features: torch.Tensor, num_samples: int, temperature: float = 0.01):
        """Posterior draws outside Pyro (fast predictive).

        Returns:
            ``lam [S, N, T, G]`` and ``gate [S, N, T, G]`` (ones without a gate site).
        """
        local, _ = self.sample_posterior(features, num_samples, temperature)
        return local["lam"], local["inclusion"]


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
