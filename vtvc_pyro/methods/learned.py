"""Learned shared coefficients: aTLAS-style block coefficients (labelled train split, selected on val) and
AdaMerging (entropy minimisation on the unlabelled test inputs: test-time adaptation, by design).

Both are tuned on val like VTVC: each learning rate of a small grid gets the same step budget, and
the state with the lowest val NLL wins (over checkpoints and learning rates alike).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..compose.engine import Composer
from ..data.batches import minibatch_indices
from ..data.split import Split
from ..progress import track
from .merges import accuracy, class_logits, nll, predict_shared

log = logging.getLogger(__name__)

ATLAS_LR = 5e-2
"""aTLAS's base learning rate (plain Adam, constant rate); the fit's ``lr_factors`` scale it into the grid."""

ATLAS_LRS = (ATLAS_LR,)
"""aTLAS's learning-rate grid when none is given: the base rate alone."""

ADAMERGING_LRS = (1e-3, 1e-2)
"""AdaMerging's learning-rate grid (Adam, the paper's 1e-3 and a faster one)."""


def _budget(lrs, kwargs: dict) -> dict:
    """The search a tuned method got, as ``metrics.json`` records it for every learned method."""
    return {"fits": len(lrs), "steps": kwargs.get("steps"), "batch_size": kwargs.get("batch_size")}


def _val_record(composer, head, val: Split, lam, step: int, **extra) -> dict:
    probs = predict_shared(composer, head, val.images.to(head.device), lam, classes=val.classes)
    return {"step": step, "valnll": nll(probs, val.labels), "valaccuracy": accuracy(probs, val.labels), **extra}


def learn_shared_coefficients(
    composer: Composer,
    head: torch.Tensor,
    train: Split,
    val: Split,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 5e-2,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """aTLAS-style: one learned coefficient per (task, group) shared by all samples, zero-initialised,
    trained with cross-entropy through the frozen head by plain Adam at a constant rate; the
    checkpoint with the lowest val NLL wins.

    ``train``, ``val``: their ``classes [N, C]`` (when set) are each image's class set (task
    addition: its own task's head); features are not read.

    Returns:
        ``lam [T, G]`` and a history dict.
    """
    device = head.device
    lam = torch.zeros(composer.num_tasks, composer.num_groups, device=device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    best = _val_record(composer, head, val, lam.detach(), 0)
    best_lam, history = lam.detach().clone(), [best]
    classes = train.classes
    for step, idx in enumerate(track(minibatch_indices(len(train), batch_size, steps, seed), f"atlas lr {lr:g}",
                                     total=steps, enabled=progress, leave=False), 1):
        x, y = train.images[idx].to(device), train.labels[idx].to(device)
        mask = None if classes is None else classes[idx].to(device)
        loss = F.cross_entropy(class_logits(composer.shared(x, lam), head, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            record = _val_record(composer, head, val, lam.detach(), step, loss=loss.item())
            history.append(record)
            if record["valnll"] < best["valnll"]:
                best, best_lam = record, lam.detach().clone()
    return best_lam, {"history": history, "best_step": best["step"], "best_valnll": best["valnll"],
                      "best_valaccuracy": best["valaccuracy"], "lr": lr}


def tuned_shared_coefficients(composer, head, train, val, lrs=ATLAS_LRS, **kwargs) -> tuple[torch.Tensor, dict]:
    """:func:`learn_shared_coefficients` at every rate of ``lrs``; the lowest val NLL wins."""
    runs = [learn_shared_coefficients(composer, head, train, val, lr=lr, **kwargs) for lr in lrs]
    lam, info = min(runs, key=lambda run: run[1]["best_valnll"])
    return lam, {**info, "valnll_by_lr": {r[1]["lr"]: r[1]["best_valnll"] for r in runs}, "budget": _budget(lrs, kwargs)}


def adamerging(
    composer: Composer,
    head: torch.Tensor,
    unlabeled: torch.Tensor,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 1e-3,
    init: float = 0.3,
    seed: int = 0,
    progress: bool = False,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """AdaMerging (Yang et al., ICLR 2024): coefficients learned by minimising the Shannon entropy of
    the predictions on unlabelled test inputs; started at ``init``, clamped to [0, 1] after each step.

    Use a ``layer``-granularity composer for layer-wise AdaMerging. No labels are read: the last
    coefficients are returned (:func:`tuned_adamerging` chooses the rate on val). ``classes [N, C]``
    (task addition): each unlabelled image's class set, i.e. which task's head scores it.

    Returns:
        ``lam [T, G]`` and a history dict (mean entropy every 50 steps).
    """
    device = head.device
    lam = torch.full((composer.num_tasks, composer.num_groups), init, device=device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    history = []
    for step, idx in enumerate(track(minibatch_indices(len(unlabeled), batch_size, steps, seed),
                                     f"adamerging lr {lr:g}", total=steps, enabled=progress, leave=False), 1):
        mask = None if classes is None else classes[idx].to(device)
        logits = class_logits(composer.shared(unlabeled[idx].to(device), lam), head, mask)
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        entropy.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        if step % 50 == 0 or step == steps:
            history.append({"step": step, "entropy": entropy.item()})
    return lam.detach(), {"history": history, "lr": lr}


def tuned_adamerging(composer, head, unlabeled, val, lrs=ADAMERGING_LRS, **kwargs) -> tuple[torch.Tensor, dict]:
    """:func:`adamerging` at every rate of ``lrs``; the rate whose coefficients have the lowest val NLL wins
    (val labels choose the rate only; the adaptation itself reads no labels)."""
    runs = []
    for lr in lrs:
        lam, info = adamerging(composer, head, unlabeled, lr=lr, **kwargs)
        runs.append((lam, {**info, **_val_record(composer, head, val, lam, kwargs.get("steps", 600))}))
    lam, info = min(runs, key=lambda run: run[1]["valnll"])
    return lam, {**info, "valnll_by_lr": {r[1]["lr"]: r[1]["valnll"] for r in runs}, "budget": _budget(lrs, kwargs)}
