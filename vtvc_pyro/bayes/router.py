"""The deterministic per-sample router: VTVC's amortized network trained by maximum likelihood.

The competitor that VTVC must beat to justify being Bayesian (WEMoE and MetaNet route per sample
without a posterior). It is the hierarchical guide's own network, used as a point estimate:

    λ_i = σ(router(x_i)) ⊙ Σ_k q(k | x_i) λ̄^k          (:meth:`HierarchicalGuide.mean_coefficients`)

with a Gaussian-prior guide (so no gates), trained by cross-entropy alone: no prior, no KL, no
sampled routes. Everything else is VTVC's: the features it reads, K candidates chosen on val, the
optimiser groups, schedule, clipping, step budget, its learning-rate grid (VTVC's two rates times
the same factors, the fit's ``lr_factors``), and the state kept by the lowest val NLL.

The flat model's twin (:func:`make_flat_twin`) is the same idea for the flat model: its amortized
guide (same prior parametrisation, e.g. gate probability × slab mean, same heads and width), used
through :meth:`~vtvc_pyro.bayes.guide.AmortizedGatedGuide.mean_coefficients` and trained by
cross-entropy alone, with the same search.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..compose.engine import Composer
from ..config import SVIConfig
from ..data.batches import minibatch_indices
from ..data.split import Split
from ..progress import track
from .guide import GuideSettings
from .hierarchical import HierarchicalGuide, HierarchicalModel
from .priors import make_prior
from .registry import make_vtvc
from .predictive import mean_probs
from .svi import parameter_groups

ROUTER_LR_FACTORS = (1.0,)
"""The learning-rate grid when none is given, as factors of VTVC's rates: VTVC's own alone."""


@dataclass
class RouterFit:
    """What :func:`fit_router` chose: the guide (best state), its val NLL and the history."""

    guide: HierarchicalGuide
    model: HierarchicalModel
    best_step: int = 0
    best_val_nll: float = math.inf
    history: list[dict] = field(default_factory=list)


def make_router(composer: Composer, head: torch.Tensor, feature_dim: int, components: int = 1,
                hidden: int | None = None, slab_mean_init: float = 0.3, seed: int = 0):
    """``(model, guide)`` of a router with ``components`` compositions (the model only scores logits)."""
    torch.manual_seed(seed)
    prior = make_prior("gaussian")
    model = HierarchicalModel(composer, head, prior, routing=True, components=components)
    guide = HierarchicalGuide(feature_dim, composer.num_tasks, composer.num_groups, prior, routing=True,
                              components=components, hidden=hidden, slab_mean_init=slab_mean_init,
                              component_scale=composer.component_scales())
    return model.to(head.device), guide.to(head.device)


def make_flat_twin(composer: Composer, head: torch.Tensor, feature_dim: int, prior, settings: GuideSettings,
                   seed: int = 0):
    """``(model, guide)`` of the flat model's deterministic twin: its amortized guide without the keep
    rule (so training and prediction use the same coefficients), initialised with ``seed``."""
    torch.manual_seed(seed)
    model, guide = make_vtvc("flat", "amortized", composer, head, prior, feature_dim, settings=settings)
    return model.to(head.device), guide.to(head.device)


def _val_nll(model, guide, val: Split) -> float:
    probs = mean_probs(model, guide, val.images, val.features, classes=val.classes)
    return float(-probs.gather(-1, val.labels.to(probs.device)[:, None]).clamp_min(1e-12).log().mean())


def fit_router(model, guide: HierarchicalGuide, train: Split, val: Split, cfg: SVIConfig, seed: int = 0,
               progress: bool = False) -> RouterFit:
    """Train ``guide.mean_coefficients`` by cross-entropy; on return the guide holds the best-on-val state.

    Args:
        train, val: as for :func:`~vtvc_pyro.bayes.svi.fit_svi`.
        cfg: VTVC's SVI settings (steps, batch size, rates, decay, clipping, eval_every).
    """
    images, features, labels, classes = train.images, train.features, train.labels, train.classes
    if hasattr(guide, "initialize"):  # the hierarchical guide's prototypes start at k-means centroids
        guide.initialize(features, seed=seed)
    opt = torch.optim.AdamW(parameter_groups(guide, cfg), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    params = [p for p in guide.parameters() if p.requires_grad]
    result = RouterFit(guide, model)
    best_state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    batches = minibatch_indices(len(images), cfg.batch_size, cfg.steps, seed)
    for step, idx in enumerate(track(batches, f"router K={getattr(guide, 'components', 1)} lr {cfg.lr:g}", total=cfg.steps,
                                     enabled=progress, leave=False), 1):
        guide.train()
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for part in idx.to(features.device).chunk(cfg.accumulate):  # as SVI: backward per micro-batch
            lam = guide.mean_coefficients(features[part])  # [B, T, G]
            logits = model.logits(images[part], lam, None if classes is None else classes[part])
            part_loss = F.cross_entropy(logits, labels[part]) * len(part) / len(idx)
            part_loss.backward()
            loss += part_loss.detach()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            nll = _val_nll(model, guide, val)
            result.history.append({"step": step, "loss": float(loss), "val_nll": nll})
            if nll < result.best_val_nll:
                result.best_val_nll, result.best_step = nll, step
                best_state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    guide.load_state_dict(best_state)
    guide.eval()
    return result


def tuned_point_estimate(build: Callable[[int], tuple], train: Split, val: Split, cfg: SVIConfig,
                         components: list[int], seed: int = 0, progress: bool = False,
                         lr_factors: tuple[float, ...] = ROUTER_LR_FACTORS) -> RouterFit:
    """:func:`fit_router` of ``build(k) -> (model, guide)`` for every candidate number of compositions
    ``k`` and learning-rate factor (VTVC's ``lr`` and ``global_lr`` × each of ``lr_factors``, as VTVC
    searches); the lowest val NLL wins. Its last history entry records the choice and the search
    (``fits``: how many were run)."""
    fits = {}
    for k in components:
        for factor in lr_factors:
            model, guide = build(k)
            scaled = replace(cfg, lr=cfg.lr * factor, global_lr=cfg.global_lr * factor)
            fits[(k, cfg.lr * factor)] = fit_router(model, guide, train, val, scaled, seed, progress)
    best_key = min(fits, key=lambda key: fits[key].best_val_nll)
    best = fits[best_key]
    best.history.append({"components": best_key[0], "lr": best_key[1],
                         "val_nll_by_setting": {f"K={k}, lr={lr:g}": f.best_val_nll for (k, lr), f in fits.items()},
                         "budget": {"fits": len(fits), "steps": cfg.steps, "batch_size": cfg.batch_size}})
    return best


def tuned_router(composer: Composer, head: torch.Tensor, train: Split, val: Split, cfg: SVIConfig,
                 components: list[int], hidden: int | None = None, slab_mean_init: float = 0.3, seed: int = 0,
                 progress: bool = False, lr_factors: tuple[float, ...] = ROUTER_LR_FACTORS) -> RouterFit:
    """:func:`fit_router` for every candidate number of compositions and learning rate; the lowest val NLL wins."""
    return tuned_point_estimate(
        lambda k: make_router(composer, head, train.features.shape[1], k, hidden, slab_mean_init, seed),
        train, val, cfg, components, seed, progress, lr_factors)
