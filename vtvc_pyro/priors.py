"""Priors over composition coefficients λ ∈ R^{T×G}, one registry entry each.

A prior declares its latent sites; the model asks it for them inside the ``data`` plate, so
swapping a prior changes no model code. Every prior here uses the sites ``gate`` (optional) and
``slab`` with ``λ = gate · slab`` (or ``λ = slab`` without a gate); the guide builds the
matching sites from :attr:`Prior.has_gate`.

Usage::

    prior = make_prior("spike_slab", pi=0.3)
    lam = prior.sample(num_tasks, num_groups, like=features, temperature=0.1)  # in a model
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .errors import ConfigError

PRIORS: dict[str, type["Prior"]] = {}


def register(cls: type["Prior"]) -> type["Prior"]:
    PRIORS[cls.name] = cls
    return cls


class Prior:
    """Base class: ``sample`` draws λ of shape ``[..., T, G]`` inside the caller's plates."""

    name = ""
    has_gate = False
    analytic_kl = False
    formula = ""

    def sample(self, num_tasks: int, num_groups: int, like: torch.Tensor, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ConfigError(f"prior argument {name} must be > 0, got {value}")
    return value


@register
class SpikeAndSlab(Prior):
    """Dirac spike at zero, Gaussian slab: λ = z · s, z ~ Bernoulli(π), s ~ N(0, σ0²).

    The gate density is the relaxed Bernoulli at the temperature the guide samples with, so the
    straight-through gate values (exact 0/1 forward, relaxed backward) get a proper density.
    """

    name = "spike_slab"
    has_gate = True
    formula = "p(λ) = (1−π) δ0 + π N(0, σ0²);  λ = gate · slab"

    def __init__(self, pi: float = 0.5, slab_scale: float = 1.0, analytic_kl: float = 1.0):
        pi = float(pi)
        if not 0 < pi < 1:
            raise ConfigError(f"prior argument pi must lie in (0, 1), got {pi}")
        self.pi = pi
        self.slab_scale = _positive("slab_scale", slab_scale)
        self.analytic_kl = bool(analytic_kl)

    def sample(self, num_tasks, num_groups, like, temperature):
        shape = [num_tasks, num_groups]
        # With analytic_kl the gate's relaxed densities are masked out of the ELBO and the guide adds
        # the exact Bernoulli KL instead (see gate_kl): the Monte Carlo KL of relaxed Bernoullis at a
        # low temperature is large and noisy enough to drown the likelihood's gradient.
        with pyro.poutine.mask(mask=not self.analytic_kl):
            gate = pyro.sample(
                "gate",
                dist.RelaxedBernoulliStraightThrough(like.new_tensor(temperature), probs=like.new_tensor(self.pi))
                .expand(shape).to_event(2),
            )
        slab = pyro.sample("slab", dist.Normal(like.new_zeros(()), self.slab_scale).expand(shape).to_event(2))
        return pyro.deterministic("lam", gate * slab, event_dim=2)

    def gate_kl(self, probs: torch.Tensor) -> torch.Tensor:
        """KL(Bernoulli(q) ‖ Bernoulli(π)) summed over (task, group): ``probs [N, T, G]`` -> ``[N]``."""
        pi = probs.new_tensor(self.pi)
        kl = probs * (probs.log() - pi.log()) + (1 - probs) * ((1 - probs).log() - (1 - pi).log())
        return kl.sum((-2, -1))


class SlabOnlyPrior(Prior):
    """A prior without a gate: λ = s with s drawn from :meth:`slab_distribution`."""

    has_gate = False

    def slab_distribution(self, like: torch.Tensor) -> dist.Distribution:
        """The scalar slab density on ``like``'s device."""
        raise NotImplementedError

    def sample(self, num_tasks, num_groups, like, temperature):
        slab = pyro.sample("slab", self.slab_distribution(like).expand([num_tasks, num_groups]).to_event(2))
        return pyro.deterministic("lam", slab, event_dim=2)


@register
class Gaussian(SlabOnlyPrior):
    """No sparsity: λ = s, s ~ N(0, σ0²) (the ablation against the spike)."""

    name = "gaussian"
    formula = "p(λ) = N(0, σ0²)"

    def __init__(self, slab_scale: float = 1.0):
        self.slab_scale = _positive("slab_scale", slab_scale)

    def slab_distribution(self, like):
        return dist.Normal(like.new_zeros(()), self.slab_scale)


@register
class Laplace(SlabOnlyPrior):
    """Sparsity by shrinkage instead of a spike: λ = s, s ~ Laplace(0, b) (the Bayesian lasso)."""

    name = "laplace"
    formula = "p(λ) = Laplace(0, b)"

    def __init__(self, scale: float = 0.5):
        self.scale = _positive("scale", scale)

    def slab_distribution(self, like):
        return dist.Laplace(like.new_zeros(()), self.scale)


def make_prior(name: str, **kwargs) -> Prior:
    """Build a registered prior by name; unknown names and arguments give a clear error."""
    if name not in PRIORS:
        raise ConfigError(f"unknown prior {name!r}: choose one of {', '.join(PRIORS)} (--list-priors)")
    try:
        return PRIORS[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad arguments {kwargs} for prior {name!r} ({err}); see --list-priors") from err


def parse_prior_args(items: list[str] | None) -> dict[str, float]:
    """``["pi=0.3", "slab_scale=2"]`` -> ``{"pi": 0.3, "slab_scale": 2.0}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise ConfigError(f"--prior-arg {item!r} is not KEY=NUMBER (e.g. pi=0.3)")
    return out
