"""Baselines on the same task vectors and data: zero-shot, task arithmetic, aTLAS-style per-block.

Each method is a pure function returning what it learned, plus :func:`predict_shared` to
evaluate any batch-shared coefficients. Protocol (as for VTVC): coefficients are chosen or
learned on the target's train split, selected on val, reported on test.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .composition import Composer
from .infer import minibatch_indices

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_shared(composer: Composer, head: torch.Tensor, images: torch.Tensor, lam: torch.Tensor,
                   batch_size: int = 512) -> torch.Tensor:
    """Class probabilities ``[N, C]`` of the tower composed with shared ``lam [T, G]``."""
    out = []
    for i in range(0, len(images), batch_size):
        feats = composer.shared(images[i : i + batch_size], lam)
        out.append(torch.softmax(F.normalize(feats, dim=-1) @ head.T, -1))
    return torch.cat(out)


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(-1) == labels.to(probs.device)).float().mean())


def task_arithmetic(composer: Composer, head: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
                    grid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One λ for the sum of all task vectors, chosen on val from ``grid`` (default 0, 0.05, ..., 1).

    ``composer`` must have ``task`` granularity. Returns ``lam [T, 1]`` and the val accuracy per λ.
    """
    grid = torch.linspace(0, 1, 21) if grid is None else grid
    scores = {}
    ones = torch.ones(composer.num_tasks, composer.num_groups, device=head.device)
    for value in grid.tolist():
        scores[round(value, 4)] = _accuracy(predict_shared(composer, head, val[0], value * ones), val[1])
    best = max(scores, key=scores.get)  # ties: the smallest λ (grid order)
    return best * ones, {"val_accuracy_by_lambda": scores, "lambda": best}


def learn_shared_coefficients(
    composer: Composer,
    head: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 5e-2,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """aTLAS-style: one learned coefficient per (task, group) shared by all samples, zero-initialised,
    trained with cross-entropy through the frozen head; the checkpoint with the best val accuracy wins.

    Returns:
        ``lam [T, G]`` and a history dict.
    """
    device = head.device
    lam = torch.zeros(composer.num_tasks, composer.num_groups, device=device, requires_grad=True)
    opt = torch.optim.AdamW([lam], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best = (-1.0, lam.detach().clone(), 0)
    history = []
    for step, idx in enumerate(tqdm(minibatch_indices(len(train[0]), batch_size, steps, seed), total=steps,
                                    desc="atlas", disable=not progress, leave=False), 1):
        x, y = train[0][idx].to(device), train[1][idx].to(device)
        logits = F.normalize(composer.shared(x, lam), dim=-1) @ head.T
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([lam], 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            acc = _accuracy(predict_shared(composer, head, val[0].to(device), lam.detach()), val[1])
            history.append({"step": step, "loss": loss.item(), "val_accuracy": acc})
            if acc > best[0]:
                best = (acc, lam.detach().clone(), step)
    return best[1], {"history": history, "best_step": best[2], "best_val_accuracy": best[0]}


def zero_coefficients(composer: Composer, device) -> torch.Tensor:
    """Zero-shot is the base model: all coefficients zero."""
    return torch.zeros(composer.num_tasks, composer.num_groups, device=device)

