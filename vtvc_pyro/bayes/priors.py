"""Priors over composition coefficients λ ∈ R^{T×G}, one registry entry each.

A prior **declares its latent sites** (:class:`Site`: name, shape, support) and says how they
combine into λ. The model samples the sites inside the ``data`` plate in declaration order; the
guide builds one posterior per declared site from its support (binary: relaxed Bernoulli; real:
Normal; positive: LogNormal). Adding a prior therefore touches this file only.

Usage::

    prior = make_prior("spike_slab", pi=0.3)
    lam = prior.sample(num_tasks, num_groups, like=images, temperature=0.1)  # inside a model
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from ..errors import ConfigError

PRIORS: dict[str, type["Prior"]] = {}


def register(cls: type["Prior"]) -> type["Prior"]:
    PRIORS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Site:
    """A latent site of one sample.

    Args:
        name: Pyro site name (``gate``, ``slab``...).
        shape: ``"tg"`` -> ``[T, G]``, ``"t"`` -> ``[T]`` (one per task), ``""`` -> a scalar.
        support: ``"binary"``, ``"real"`` or ``"positive"``; decides the guide's family.
        init: initial location of the guide (Normal loc; log-median for positive sites; ignored for
            binary sites, whose start is set by the guide's ``gate_logit_init``).
    """

    name: str
    shape: str
    support: str
    init: float = 0.0

    def dims(self, num_tasks: int, num_groups: int) -> tuple[int, ...]:
        return {"tg": (num_tasks, num_groups), "t": (num_tasks,), "": ()}[self.shape]


class Prior:
    """Base class. Subclasses set :attr:`sites`, :meth:`site_prior` and :meth:`combine`."""

    name = ""
    formula = ""
    sites: tuple[Site, ...] = ()
    gate_site: str | None = None  # the binary site the guide's keep rule acts on
    value_site: str = "slab"  # the site whose |mean| and spread drive the keep rule
    kl_sites: tuple[str, ...] = ()  # sites whose KL :meth:`kl` gives in closed form (masked out of the Monte Carlo ELBO)
    # λ = ± gate × slab with q(slab) not depending on the gate's value: the gate may be held at its
    # expectation (the guide's gating "expect")
    gate_scales_slab: bool = False

    @property
    def has_gate(self) -> bool:
        return self.gate_site is not None

    def site_prior(self, name: str, values: dict[str, torch.Tensor], like: torch.Tensor,
                   temperature: float) -> dist.Distribution:
        """Scalar (or already shaped) prior of site ``name`` given the sites sampled before it."""
        raise NotImplementedError

    def combine(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """λ ``[..., T, G]`` from the site values (each ``[..., *site shape]``)."""
        raise NotImplementedError

    def condition_posterior(self, name: str, q: dist.Distribution, values: dict[str, torch.Tensor]) -> dist.Distribution:
        """The guide's q of site ``name`` given the sites drawn before it (default: independent, ``q``)."""
        return q

    def kl(self, params: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        """Closed-form KL(q ‖ p) of the :attr:`kl_sites`, summed over their site dims.

        Args:
            params: site name -> the guide's parameters (``probs`` for gates; ``loc``, ``scale`` for
                Normal slabs), each ``[*batch, *site shape]``.

        Returns:
            ``[*batch]`` (``[N]`` for per-sample sites, ``[]`` for the global composition).
        """
        raise NotImplementedError

    def inclusion(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The gate broadcast to ``[..., T, G]`` (ones without a gate), for diagnostics."""
        slab = values[self.value_site]
        if not self.has_gate:
            return torch.ones_like(slab)
        gate = values[self.gate_site]
        return (gate[..., None] if gate.dim() < slab.dim() else gate).expand_as(slab)

    def sample(self, num_tasks: int, num_groups: int, like: torch.Tensor, temperature: float,
               name: str = "lam") -> torch.Tensor:
        """Sample every declared site inside the caller's plates; returns λ ``[..., T, G]`` (recorded as ``name``)."""
        values = {}
        for site in self.sites:
            prior = self.site_prior(site.name, values, like, temperature)
            dims = site.dims(num_tasks, num_groups)
            if prior.batch_shape == torch.Size():
                prior = prior.expand(dims)
            # The kl_sites' densities are masked out of the ELBO and the guide adds their exact KL
            # instead (see kl): the Monte Carlo KL of relaxed Bernoullis at a low temperature is large
            # and noisy enough to drown the likelihood.
            with pyro.poutine.mask(mask=site.name not in self.kl_sites):
                values[site.name] = pyro.sample(site.name, prior.to_event(len(dims)))
        return pyro.deterministic(name, self.combine(values), event_dim=2)

    def settings(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "kl_sites"}


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ConfigError(f"prior argument {name} must be > 0, got {value}")
    return value


def _probability(name: str, value: float) -> float:
    value = float(value)
    if not 0 < value < 1:
        raise ConfigError(f"prior argument {name} must lie in (0, 1), got {value}")
    return value


def bernoulli_kl(probs: torch.Tensor, pi: torch.Tensor | float) -> torch.Tensor:
    """Elementwise KL(Bernoulli(probs) ‖ Bernoulli(pi))."""
    pi = torch.as_tensor(pi, dtype=probs.dtype, device=probs.device)
    return probs * (probs.log() - pi.log()) + (1 - probs) * ((1 - probs).log() - (1 - pi).log())


def normal_kl(loc: torch.Tensor, scale: torch.Tensor, prior_scale: float) -> torch.Tensor:
    """Elementwise KL(N(loc, scale²) ‖ N(0, prior_scale²))."""
    return math.log(prior_scale) - scale.log() + (scale**2 + loc**2) / (2 * prior_scale**2) - 0.5


def spike_slab_kl(probs, loc, scale, pi: float, slab_scale: float) -> torch.Tensor:
    """Elementwise KL of the paired spike-and-slab posterior against the spike-and-slab prior.

    q(gate) = Bernoulli(γ), q(slab | gate = 1) = N(μ, σ²), q(slab | gate = 0) = p(slab) = N(0, σ0²):

        KL = γ · KL(N(μ, σ²) ‖ N(0, σ0²)) + KL(Bernoulli(γ) ‖ Bernoulli(π)).

    A switched-off component (γ → 0) costs only the Bernoulli term: its slab is the prior's.
    ``probs`` broadcasts against ``loc``/``scale`` (one gate per task: pass ``probs[..., None]``
    and sum the Bernoulli term once per gate, as :meth:`SpikeAndSlab.kl` does for per-task gates).
    """
    return probs * normal_kl(loc, scale, slab_scale) + bernoulli_kl(probs, pi)


def _relaxed_gate(pi: float, like: torch.Tensor, temperature: float) -> dist.Distribution:
    """The gate density: relaxed Bernoulli at the guide's temperature, so the straight-through gate
    values (exact 0/1 forward, relaxed backward) get a proper density."""
    return dist.RelaxedBernoulliStraightThrough(like.new_tensor(temperature), probs=like.new_tensor(pi))


# ---------------------------------------------------------------- spike-and-slab family
@register
class SpikeAndSlab(Prior):
    """Dirac spike at zero, Gaussian slab: λ = z · s, z ~ Bernoulli(π), s ~ N(0, σ0²)."""

    name = "spike_slab"
    formula = "p(λ) = (1−π) δ0 + π N(0, σ0²);  λ = gate · slab"
    sites = (Site("gate", "tg", "binary"), Site("slab", "tg", "real"))
    gate_site = "gate"
    gate_scales_slab = True

    def __init__(self, pi: float = 0.5, slab_scale: float = 1.0, analytic_kl: float = 1.0):
        self.pi = _probability("pi", pi)
        self.slab_scale = _positive("slab_scale", slab_scale)
        self.analytic_kl = bool(analytic_kl)
        # the paired slab (q(slab | gate = 0) = p(slab)) makes the pair's KL closed-form; without
        # analytic_kl both sites are scored by Monte Carlo, the slab at its mean-field density
        self.kl_sites = ("gate", "slab") if self.analytic_kl else ()

    def site_prior(self, name, values, like, temperature):
        if name == "gate":
            return _relaxed_gate(self.pi, like, temperature)
        return dist.Normal(like.new_zeros(()), self.slab_scale)

    def kl(self, params):
        probs, slab = params["gate"]["probs"], params["slab"]
        if probs.dim() < slab["loc"].dim():  # one gate per task: its Bernoulli term counts once
            slab_kl = probs * normal_kl(slab["loc"], slab["scale"], self.slab_scale).sum(-1)
            return (slab_kl + bernoulli_kl(probs, self.pi)).sum(-1)
        return spike_slab_kl(probs, slab["loc"], slab["scale"], self.pi, self.slab_scale).flatten(-2).sum(-1)

    def combine(self, values):
        gate = values["gate"]
        slab = values["slab"]
        return (gate[..., None] if gate.dim() < slab.dim() else gate) * slab


@register
class TaskSpikeAndSlab(SpikeAndSlab):
    """Task-level spike-and-slab: one gate per task, shared by all of its blocks."""

    name = "task_spike_slab"
    formula = "λ_tg = z_t · s_tg,  z_t ~ Bernoulli(π),  s_tg ~ N(0, σ0²)"
    sites = (Site("gate", "t", "binary"), Site("slab", "tg", "real"))


@register
class ContinuousSpikeAndSlab(SpikeAndSlab):
    """Continuous spike-and-slab (George & McCulloch): a narrow Gaussian spike instead of a Dirac one.

    λ = s with s | z ~ N(0, σ(z)²), σ(1) = σ0 (slab), σ(0) = σ_spike (spike); the gate picks the
    scale and the coefficient itself is never exactly zero.
    """

    name = "spike_slab_continuous"
    formula = "p(λ) = (1−π) N(0, σ_spike²) + π N(0, σ0²);  λ = slab, its scale chosen by gate"
    gate_scales_slab = False  # the gate picks the slab's scale: a gate held between 0 and 1 means nothing

    def __init__(self, pi: float = 0.5, slab_scale: float = 1.0, spike_scale: float = 0.01, analytic_kl: float = 1.0):
        super().__init__(pi, slab_scale, analytic_kl)
        self.kl_sites = ("gate",) if self.analytic_kl else ()  # the slab's KL is conditional on the gate: Monte Carlo
        self.spike_scale = _positive("spike_scale", spike_scale)
        if self.spike_scale >= self.slab_scale:
            raise ConfigError(f"spike_scale ({spike_scale}) must be smaller than slab_scale ({slab_scale})")

    def _scale(self, gate: torch.Tensor) -> torch.Tensor:
        return self.spike_scale + gate * (self.slab_scale - self.spike_scale)

    def site_prior(self, name, values, like, temperature):
        if name == "gate":
            return _relaxed_gate(self.pi, like, temperature)
        return dist.Normal(torch.zeros_like(values["gate"]), self._scale(values["gate"]))

    def condition_posterior(self, name, q, values):
        """q(slab | gate): the learned Normal when the gate is on, the spike itself when it is off.

        With a mean-field q(slab) every switched-off slab would pay a KL against the narrow spike
        (hundreds of nats for a slab mean of 0.3 and σ_spike = 0.01) and SVI shrinks all slabs.
        """
        if name != "slab":
            return q
        gate = values["gate"]
        return dist.Normal(gate * q.loc, gate * q.scale + (1 - gate) * self.spike_scale)

    def kl(self, params):
        return bernoulli_kl(params["gate"]["probs"], self.pi).flatten(-2).sum(-1)

    def combine(self, values):
        return values["slab"]


@register
class NegativeSpikeAndSlab(SpikeAndSlab):
    """Spike-and-slab for task negation: the slab lives on negative coefficients.

    λ = −z · s, z ~ Bernoulli(π), s ~ HalfNormal(σ0): a kept component can only subtract its task
    vector.
    """

    name = "spike_slab_negative"
    formula = "λ = −gate · slab,  gate ~ Bernoulli(π),  slab ~ HalfNormal(σ0)"
    sites = (Site("gate", "tg", "binary"), Site("slab", "tg", "positive", init=math.log(0.3)))

    def __init__(self, pi: float = 0.5, slab_scale: float = 1.0, analytic_kl: float = 1.0):
        super().__init__(pi, slab_scale, analytic_kl)
        # KL(LogNormal ‖ HalfNormal) has no closed form: the slab is scored by Monte Carlo
        self.kl_sites = ("gate",) if self.analytic_kl else ()

    def kl(self, params):
        return bernoulli_kl(params["gate"]["probs"], self.pi).flatten(-2).sum(-1)

    def site_prior(self, name, values, like, temperature):
        if name == "gate":
            return _relaxed_gate(self.pi, like, temperature)
        return dist.HalfNormal(like.new_tensor(self.slab_scale))

    def combine(self, values):
        return -super().combine(values)


# ---------------------------------------------------------------- gate-less priors
class SlabOnlyPrior(Prior):
    """A prior without a gate: λ = s with s drawn from :meth:`slab_distribution`."""

    sites = (Site("slab", "tg", "real"),)

    def slab_distribution(self, like: torch.Tensor) -> dist.Distribution:
        """The scalar slab density on ``like``'s device."""
        raise NotImplementedError

    def site_prior(self, name, values, like, temperature):
        return self.slab_distribution(like)

    def combine(self, values):
        return values["slab"]


@register
class Gaussian(SlabOnlyPrior):
    """No sparsity: λ = s, s ~ N(0, σ0²) (the ablation against the spike)."""

    name = "gaussian"
    formula = "p(λ) = N(0, σ0²)"

    kl_sites = ("slab",)

    def __init__(self, slab_scale: float = 1.0):
        self.slab_scale = _positive("slab_scale", slab_scale)

    def slab_distribution(self, like):
        return dist.Normal(like.new_zeros(()), self.slab_scale)

    def kl(self, params):
        return normal_kl(params["slab"]["loc"], params["slab"]["scale"], self.slab_scale).flatten(-2).sum(-1)


@register
class Laplace(SlabOnlyPrior):
    """Sparsity by shrinkage instead of a spike: λ = s, s ~ Laplace(0, b) (the Bayesian lasso)."""

    name = "laplace"
    formula = "p(λ) = Laplace(0, b)"

    def __init__(self, scale: float = 0.5):
        self.scale = _positive("scale", scale)

    def slab_distribution(self, like):
        return dist.Laplace(like.new_zeros(()), self.scale)


@register
class Horseshoe(Prior):
    """Horseshoe (Carvalho, Polson & Scott), non-centred: λ_tg = τ · κ_tg · s_tg.

    τ ~ HalfCauchy(τ_scale) is the sample's global scale (shared by its T·G coefficients),
    κ_tg ~ HalfCauchy(1) the local scales and s_tg ~ N(0, 1). The non-centred form keeps the
    mean-field guide usable (a centred horseshoe posterior is a funnel).
    """

    name = "horseshoe"
    formula = "λ_tg = τ κ_tg s_tg,  τ ~ C⁺(0, τ_scale),  κ_tg ~ C⁺(0, 1),  s_tg ~ N(0, 1)"
    sites = (Site("tau", "", "positive"), Site("kappa", "tg", "positive"), Site("slab", "tg", "real"))

    def __init__(self, global_scale: float = 1.0):
        self.global_scale = _positive("global_scale", global_scale)

    def site_prior(self, name, values, like, temperature):
        if name == "tau":
            return dist.HalfCauchy(like.new_tensor(self.global_scale))
        if name == "kappa":
            return dist.HalfCauchy(like.new_tensor(1.0))
        return dist.Normal(like.new_zeros(()), 1.0)

    def combine(self, values):
        return values["tau"][..., None, None] * values["kappa"] * values["slab"]


# ---------------------------------------------------------------- registry helpers
def make_prior(name: str, **kwargs) -> Prior:
    """Build a registered prior by name; unknown names and arguments give a clear error."""
    if name not in PRIORS:
        raise ConfigError(f"unknown prior {name!r}: choose one of {', '.join(PRIORS)} (vtvc fit --list_priors)")
    try:
        return PRIORS[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad arguments {kwargs} for prior {name!r} ({err}); see vtvc fit --list_priors") from err
