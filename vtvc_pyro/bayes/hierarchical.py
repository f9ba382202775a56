"""The hierarchical composition model: a few sparse global compositions, chosen per image.

Global latents, outside the data plate (their KL is counted once for the data set)::

    gate^k_tg ~ Bernoulli(π),  slab^k_tg ~ N(0, σ0²)   (or any registered prior), k = 1..K
    λ̄^k = gate^k ⊙ slab^k                             [K, T, G]  the data set's compositions
    ρ_t ~ Beta(a, b)                                   [T]        (routing only) use rate of vector t

Local latents, one per image i inside the ``data`` plate::

    c_i ~ Uniform{1..K}                                [N]        which composition image i follows
    r_it ~ Bernoulli(ρ_t)                              [N, T]     (routing only) does i use vector t
    λ_i = r_i ⊙ λ̄^{c_i}   (λ_i = λ̄^{c_i} without routing)       [N, T, G]
    y_i ~ Categorical(logits = H · normalize(f(x_i; θ0 + Σ_t,b λ_i,t,g(b) τ_t,b)))

Why this shape:

- **One composition fits all** (every image of ``rot-noise`` needs the same vectors): K = 1 and
  λ_i = λ̄ for every image: the model *is* Bayesian shared coefficients (aTLAS with a spike-and-
  slab posterior), and every image's evidence goes into the one λ̄.
- **Images differ** (``mixed``: each image needs its own pair of vectors): each image follows one
  of K compositions, and each composition is learned from all the images that follow it. The
  per-image latent is one discrete choice (plus T route gates with routing), not T·G free
  coefficients, so the inference network cannot turn into a second, unregularised set of shared
  coefficients, and the posterior of λ_i is the mixture Σ_k q(c_i = k | x_i) q(λ̄^k).
- **Sparsity**: the spike-and-slab drops components (task, block) of each composition; with
  routing, the Beta-Bernoulli gates drop whole task vectors per image, and ρ_t, learned from all
  images, says how often each vector is needed.

How many compositions: the fit tries every K of ``FitConfig.components`` and keeps the lowest val
NLL (:func:`vtvc_pyro.protocols.fitting.fit_vtvc`).

Guide (site by site the model's sites): q(gate, slab) the paired spike-and-slab with learned
constants (q(slab | gate = 0) = p(slab)); q(c_i | x_i) from a :class:`PrototypeAssigner` on the
image's base features, **enumerated exactly** (``TraceEnum_ELBO``: no sampling noise in the
choice); q(ρ_t) = Beta(α_t, β_t); q(r_it | x_i) = Bernoulli(γ_it) from an amortized network. The
guide never sees the label. The KLs of ρ and of the routes are exact, and so are the gates' and
slabs' for the priors with a closed form (``spike_slab``, ``task_spike_slab``, ``gaussian``; the
gate only for ``spike_slab_continuous`` and ``spike_slab_negative``; Monte Carlo for ``laplace`` and
``horseshoe``): ``pyro.factor`` in the guide, the sites masked in both. The component's KL comes
from the enumeration. With ``kl_weight = 1`` and ``kl_reduction = sum`` the loss is the negative
ELBO of this model; a KL weight below 1 tempers the posterior (a likelihood counted 1 / kl_weight
times). ``local_kl_weight`` weighs the per-image latents' KL (component, routes) on its own: 1
leaves them untempered while the global composition's KL stays tempered.

``routing=False`` and K = 1 (the ``global`` guide) is task-level VI: λ_i = λ̄ for every image.

Usage::

    model, guide = make_vtvc("hierarchical", "amortized_gated", composer, head, prior, feature_dim=64,
                             components=4)
"""

from __future__ import annotations

import contextlib
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import kl_divergence
from torch.distributions.utils import clamp_probs

from ..compose.engine import Composer
from ..compose.heads import class_logits
from .guide import (
    GatedGuide,
    GuideSettings,
    gate_logit_start,
    mlp_head,
    point_values,
    sample_sites,
    site_posterior,
)
from .model import VTVCModel
from .priors import Prior


def expected_route_kl(probs: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """E_{ρ ~ Beta(α, β)} KL(Bernoulli(γ) ‖ Bernoulli(ρ)), summed over tasks.

    Args:
        probs: ``[N, T]`` route probabilities γ; alpha, beta: ``[T]``.

    Returns:
        ``[N]``. Uses E log ρ = ψ(α) − ψ(α + β) and E log(1 − ρ) = ψ(β) − ψ(α + β).
    """
    digamma_sum = torch.digamma(alpha + beta)
    e_log_rho = torch.digamma(alpha) - digamma_sum
    e_log_not = torch.digamma(beta) - digamma_sum
    kl = probs * (probs.log() - e_log_rho) + (1 - probs) * ((1 - probs).log() - e_log_not)
    return kl.sum(-1)


def spherical_kmeans(features: torch.Tensor, k: int, seed: int = 0, restarts: int = 5, iters: int = 50) -> torch.Tensor:
    """Centroids ``[K, D]`` (unit norm) of ``features [N, D]`` by cosine k-means, best of ``restarts``."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    best, best_fit = None, -math.inf
    for _ in range(restarts):
        centroids = x[torch.randperm(len(x), generator=g)[:k].to(x.device)].clone()
        for _ in range(iters):
            assign = (x @ centroids.T).argmax(-1)
            for j in range(k):
                if (assign == j).any():
                    centroids[j] = torch.nn.functional.normalize(x[assign == j].mean(0), dim=0)
        fit = float((x @ centroids.T).max(-1).values.sum())
        if fit > best_fit:
            best, best_fit = centroids, fit
    return best


class PrototypeAssigner(nn.Module):
    """q(c_i = k | x_i) = softmax_k(s · cos(e_i, μ_k)): one learned prototype μ_k per composition.

    :meth:`initialize` places the prototypes at the k-means centroids of the training images' base
    features, so images that look alike start in the same component (an MoE's usual start; a
    random start lets two domains share a component and stay there).
    """

    def __init__(self, feature_dim: int, k: int, scale: float = 10.0):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(k, feature_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    @torch.no_grad()
    def initialize(self, features: torch.Tensor, seed: int = 0) -> None:
        self.prototypes.copy_(spherical_kmeans(features, len(self.prototypes), seed).to(self.prototypes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features [N, D]`` -> logits ``[N, K]``."""
        cos = torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(self.prototypes, dim=-1).T
        return self.log_scale.exp() * cos


def components_plate(k: int):
    """The plate of the K global compositions (dim -1: they live outside the data plate), or none for K = 1."""
    return pyro.plate("components", k, dim=-1) if k > 1 else contextlib.nullcontext()


class HierarchicalModel(VTVCModel):
    """Pyro model of the module docstring.

    Args:
        composer, head, prior: as for :class:`~vtvc_pyro.bayes.model.VTVCModel`; ``prior`` is the
            prior of the global composition λ̄.
        routing: per-image Beta-Bernoulli routing (``False``: λ_i = λ̄, task-level inference).
        route_a, route_b: the Beta(a, b) prior of each task vector's use rate ρ_t.
        components: K global compositions λ̄^(1..K); each image follows one, c_i ~ Uniform(K),
            which the guide enumerates exactly (``TraceEnum_ELBO``). K = 1: one composition.
    """

    def __init__(self, composer: Composer, head: torch.Tensor, prior: Prior, routing: bool = True,
                 route_a: float = 1.0, route_b: float = 1.0, components: int = 1):
        super().__init__(composer, head, prior)
        self.routing = routing
        self.route_a, self.route_b = float(route_a), float(route_b)
        self.components = int(components)

    def forward(self, images, features, labels=None, num_data=None, kl_weight=1.0, temperature=0.1, classes=None,
                local_kl_weight=None):
        """Pyro model; the signature of :meth:`VTVCModel.forward` (``features`` unused here): the
        global latents' KL is weighted by ``kl_weight``, the per-image ones' (component, routes) by
        ``local_kl_weight`` (``None``: ``kl_weight``).

        Returns:
            λ ``[*E, *P, N, T, G]`` (``P``: optional particle dims; ``E``: the enumerated component
            dim, size K, when the guide enumerates it).
        """
        n, t, k = images.shape[0], self.composer.num_tasks, self.components
        num_data = num_data or n
        local = kl_weight if local_kl_weight is None else local_kl_weight
        with pyro.poutine.scale(scale=kl_weight):
            with components_plate(k):
                lam_bar = self.prior.sample(t, self.composer.num_groups, images, temperature, name="lam_bar")
            if self.routing:
                with pyro.poutine.mask(mask=False):  # its KL is added exactly by the guide
                    rho = pyro.sample("rho", dist.Beta(images.new_tensor(self.route_a), images.new_tensor(self.route_b))
                                      .expand([t]).to_event(1))
        with pyro.plate("data", num_data, subsample=torch.arange(n, device=images.device), dim=-1):
            if k > 1:  # which composition image i follows; the guide enumerates it exactly
                with pyro.poutine.scale(scale=local):
                    component = pyro.sample("component", dist.Categorical(logits=images.new_zeros(k)))
                lam_bar = lam_bar[component]  # [K, 1, T, G] enumerated, [N, T, G] sampled
            if self.routing:
                probs = torch.broadcast_to(rho, (*rho.shape[:-2], n, t))
                with pyro.poutine.scale(scale=local), pyro.poutine.mask(mask=False):
                    route = pyro.sample("route", dist.RelaxedBernoulliStraightThrough(
                        images.new_tensor(temperature), probs=clamp_probs(probs)).to_event(1))
                lam = route[..., None] * lam_bar  # [*P, N, T, 1] * [*P, 1, T, G]
            else:
                lam = lam_bar * images.new_ones(n, 1, 1)
            lam = pyro.deterministic("lam", lam, event_dim=2)
            if not self.routing and lam_bar.dim() == 2:  # one composition for the batch: aTLAS's cost
                logits = class_logits(self.composer.shared(images, lam_bar), self.head, classes)
            else:
                logits = self.logits(images, lam, classes)
            self.observe(logits, labels)
        return lam


class HierarchicalGuide(GatedGuide):
    """The guide of :class:`HierarchicalModel`: global constants for λ̄ and ρ, amortized routes.

    Args:
        feature_dim: ``D``, the base image feature size.
        num_tasks, num_groups: ``T`` and ``G``.
        prior: the model's prior of λ̄ (its sites are the guide's global sites).
        settings: width of the router, keep rule on λ̄'s gates, initial global posterior
            (:class:`~vtvc_pyro.bayes.guide.GuideSettings`).
        routing: must match the model's.
        route_a, route_b: the model's Beta prior; q(ρ) starts there and the router's output bias at
            its mean a / (a + b).
        components: the model's K; q(c_i | x_i) comes from a :class:`PrototypeAssigner`, and each
            component's slab starts at ``slab_mean_init`` plus a little noise (symmetry breaking).
        component_scale: ``[T, G]`` relative task-vector sizes (the keep rule's importance).
        overrides: :class:`~vtvc_pyro.bayes.guide.GuideSettings` fields by name, applied over ``settings``.
    """

    def __init__(self, feature_dim: int, num_tasks: int, num_groups: int, prior: Prior,
                 settings: GuideSettings | None = None, routing: bool = True, route_a: float = 1.0,
                 route_b: float = 1.0, components: int = 1, component_scale: torch.Tensor | None = None, **overrides):
        settings = GuideSettings.of(settings, **overrides)
        super().__init__(num_tasks, num_groups, prior, settings)
        self.routing, self.components = routing, int(components)
        lead = (self.components,) if self.components > 1 else ()
        self.route_a, self.route_b = float(route_a), float(route_b)
        self._register_component_scale(component_scale)
        slab_mean_init, slab_logvar_init = settings.slab_mean_init, settings.slab_logvar_init
        gate_logit_init, hidden, init_std = settings.gate_logit_init, settings.hidden, settings.init_std
        # the global posterior: learned constants, one per site parameter (optimised at the global lr)
        self.composition = nn.ParameterDict()
        for site in prior.sites:
            dims = site.dims(num_tasks, num_groups)
            if site.support == "binary":
                logit = gate_logit_start(prior, gate_logit_init)
                self.composition[f"{site.name}_logit"] = nn.Parameter(torch.full((*lead, *dims), logit))
                continue
            loc = torch.full((*lead, *dims), float(slab_mean_init if site.name == "slab" and site.support == "real"
                                                   else site.init))
            if lead:
                loc = loc + 0.05 * torch.randn_like(loc)
            self.composition[f"{site.name}_loc"] = nn.Parameter(loc)
            self.composition[f"{site.name}_logvar"] = nn.Parameter(torch.full((*lead, *dims), float(slab_logvar_init)))
        if self.components > 1:
            self.assigner = PrototypeAssigner(feature_dim, self.components)
        if routing:
            self.composition["rho_log_alpha"] = nn.Parameter(torch.full((num_tasks,), math.log(route_a)))
            self.composition["rho_log_beta"] = nn.Parameter(torch.full((num_tasks,), math.log(route_b)))
            self.router = mlp_head(feature_dim, hidden or max(feature_dim // 4, num_tasks), num_tasks, init_std)
            with torch.no_grad():  # start at the prior's mean use rate
                self.router[2].bias.add_(math.log(route_a / route_b))

    def initialize(self, features: torch.Tensor, seed: int = 0) -> None:
        """Data-dependent start before SVI: the assigner's prototypes at the k-means centroids of the
        training images' base features ``[N, D]`` (no labels read)."""
        if self.components > 1:
            self.assigner.initialize(features, seed)

    # ------------------------------------------------------------ posterior parameters
    def composition_params(self) -> dict[str, dict[str, torch.Tensor]]:
        """The global posterior's parameters per site, each ``[*site shape]`` (gates: ``logit``, ``reliable``,
        ``keep``, ``fixed``, ``probs``: :func:`~vtvc_pyro.bayes.guide.gate_site_probs`)."""
        out = {}
        for site in self.prior.sites:
            if site.support == "binary":
                out[site.name] = {"logit": self.composition[f"{site.name}_logit"]}
                continue
            logvar = self.composition[f"{site.name}_logvar"].clamp(self.logvar_min, self.logvar_max)
            out[site.name] = {"loc": self.composition[f"{site.name}_loc"], "scale": torch.exp(0.5 * logvar)}
        self.gate_params(out)
        return out

    def rho_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α [T], β [T])`` of q(ρ)."""
        return self.composition["rho_log_alpha"].exp(), self.composition["rho_log_beta"].exp()

    def component_probs(self, features: torch.Tensor) -> torch.Tensor:
        """q(c_i = k | x_i): ``features [N, D]`` -> ``[N, K]`` (``[N, 1]`` of ones for K = 1)."""
        if self.components == 1:
            return features.new_ones(features.shape[0], 1)
        return torch.softmax(self.assigner(features), -1)

    def route_probs(self, features: torch.Tensor) -> torch.Tensor:
        """q(r_it = 1 | x_i): ``features [N, D]`` -> ``[N, T]`` (ones without routing)."""
        if not self.routing:
            return features.new_ones(features.shape[0], self.num_tasks)
        return clamp_probs(torch.sigmoid(self.router(features)))

    # ------------------------------------------------------------ Pyro guide
    def forward(self, images, features, labels=None, num_data=None, kl_weight=1.0, temperature=0.1,
                local_kl_weight=None):
        """Pyro guide; mirrors :meth:`HierarchicalModel.forward` site by site (and its KL weights)."""
        params = self.composition_params()
        dims = {s.name: len(s.dims(self.num_tasks, self.num_groups)) for s in self.prior.sites}
        values = {}
        with pyro.poutine.scale(scale=kl_weight):
            with components_plate(self.components):
                for site in self.prior.sites:
                    q = site_posterior(self.prior, site, params[site.name], temperature, values).to_event(dims[site.name])
                    with pyro.poutine.mask(mask=site.name not in self.prior.kl_sites):
                        values[site.name] = pyro.sample(site.name, q)
                if self.prior.kl_sites:
                    # a guide factor adds to log q: +KL here subtracts the exact KL from the ELBO, once
                    pyro.factor("kl", self.prior.kl(params), has_rsample=True)
            if self.routing:
                alpha, beta = self.rho_params()
                with pyro.poutine.mask(mask=False):
                    pyro.sample("rho", dist.Beta(alpha, beta).to_event(1))
                prior_rho = dist.Beta(alpha.new_tensor(self.route_a), alpha.new_tensor(self.route_b))
                pyro.factor("rho_kl", kl_divergence(dist.Beta(alpha, beta), prior_rho).sum(), has_rsample=True)
        if self.routing or self.components > 1:
            n = features.shape[0]
            with pyro.plate("data", num_data or n, subsample=torch.arange(n, device=features.device), dim=-1):
                with pyro.poutine.scale(scale=kl_weight if local_kl_weight is None else local_kl_weight):
                    if self.components > 1:
                        pyro.sample("component", dist.Categorical(probs=self.component_probs(features)),
                                    infer={"enumerate": "parallel"})
                    if not self.routing:
                        return params
                    probs = self.route_probs(features)
                    with pyro.poutine.mask(mask=False):
                        pyro.sample("route", dist.RelaxedBernoulliStraightThrough(
                            probs.new_tensor(temperature), probs=probs).to_event(1))
                    pyro.factor("route_kl", expected_route_kl(probs, alpha, beta), has_rsample=True)
        return params

    # ------------------------------------------------------------ outside Pyro
    def mean_coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """Deterministic coefficients ``[N, T, G]``: E[r_it] times λ̄ at its point values (eval: kept gates only)."""
        lam_bar = self.prior.combine(point_values(self.prior, self.composition_params()))  # [(K,) T, G]
        if self.components > 1:
            lam_bar = torch.einsum("nk,ktg->ntg", self.component_probs(features), lam_bar)
        return self.route_probs(features)[..., None] * lam_bar

    @torch.no_grad()
    def sample_posterior(self, features: torch.Tensor, num_samples: int, temperature: float = 0.01,
                         shared: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Posterior draws outside Pyro, every site by name.

        Args:
            shared: global draws of an earlier call (the same images' other chunks), reused so that
                draw ``s`` is one joint draw for every image; ``None`` draws them.

        Returns:
            ``(local, shared)``: ``local`` holds ``lam`` and ``inclusion`` (route × gate)
            ``[S, N, T, G]``, ``route [S, N, T]`` (with routing) and ``component [S, N]`` (K > 1);
            ``shared`` every site of the prior of λ̄, ``[S, (K,) *site dims]``.
        """
        if shared is None:
            shared = sample_sites(self.prior, self.composition_params(), num_samples, temperature)
        lam_bar, gate = self.prior.combine(shared), self.prior.inclusion(shared)  # [S, (K,) T, G]
        local = {}
        if self.components > 1:  # each draw: image i follows its own drawn component
            c = torch.distributions.Categorical(probs=self.component_probs(features)).sample((num_samples,))  # [S, N]
            draw = torch.arange(num_samples, device=c.device)[:, None]
            lam_bar, gate = lam_bar[draw, c], gate[draw, c]  # [S, N, T, G]
            local["component"] = c
        else:
            lam_bar, gate = lam_bar[:, None], gate[:, None]  # [S, 1, T, G]
        probs = self.route_probs(features)
        if self.routing:
            route = dist.RelaxedBernoulliStraightThrough(probs.new_tensor(temperature), probs=probs).rsample((num_samples,))
            local["route"] = route
        else:
            route = probs.expand(num_samples, *probs.shape)  # every vector kept: ones, no draw
        local["lam"] = route[..., None] * lam_bar
        local["inclusion"] = route[..., None] * gate
        return local, shared

    def sample_coefficients(self, features: torch.Tensor, num_samples: int, temperature: float = 0.01):
        """Posterior draws: ``lam [S, N, T, G]`` and the inclusion ``[S, N, T, G]`` (route × gate)."""
        local, _ = self.sample_posterior(features, num_samples, temperature)
        return local["lam"], local["inclusion"]

    @torch.no_grad()
    def summary(self) -> dict[str, torch.Tensor]:
        """The global posterior in eval mode: ``inclusion`` (q(gate = 1) after the keep rule),
        ``lam_bar`` (point values) and ``kept`` (the components the keep rule finds reliable), each
        ``[T, G]`` (``[K, T, G]`` with K > 1), and, with routing, ``rho_mean [T]``."""
        params = self.composition_params()
        values = point_values(self.prior, params)
        lam_bar = self.prior.combine(values)
        ones = torch.ones_like(lam_bar)
        out = {"lam_bar": lam_bar,
               "inclusion": self.prior.inclusion(values) if self.prior.has_gate else ones,
               "kept": (self.prior.inclusion({**values, self.prior.gate_site: params[self.prior.gate_site]["reliable"]})
                        if self.prior.has_gate else ones)}
        if self.routing:
            alpha, beta = self.rho_params()
            out["rho_mean"] = alpha / (alpha + beta)
        return out
