"""Learned shared coefficients: aTLAS-style block coefficients (labelled train split, selected on val) and
AdaMerging (entropy minimisation on the unlabelled test inputs: test-time adaptation, by design).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..compose.engine import Composer
from ..data.batches import minibatch_indices

log = logging.getLogger(__name__)


from .merges import accuracy, class_logits, predict_shared


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
        loss = F.cross_entropy(class_logits(composer.shared(x, lam), head), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([lam], 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            acc = accuracy(predict_shared(composer, head, val[0].to(device), lam.detach()), val[1])
            history.append({"step": step, "loss": loss.item(), "valaccuracy": acc})
            if acc > best[0]:
                best = (acc, lam.detach().clone(), step)
    return best[1], {"history": history, "best_step": best[2], "best_valaccuracy": best[0]}


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
) -> tuple[torch.Tensor, dict]:
    """AdaMerging (Yang et al., ICLR 2024): coefficients learned by minimising the Shannon entropy of
    the predictions on unlabelled test inputs; started at ``init``, clamped to [0, 1] after each step.

    Use a ``layer``-granularity composer for layer-wise AdaMerging. No labels are read, so there is
    no selection on val: the last coefficients are returned.

    Returns:
        ``lam [T, G]`` and a history dict (mean entropy every 50 steps).
    """
    device = head.device
    lam = torch.full((composer.num_tasks, composer.num_groups), init, device=device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    history = []
    for step, idx in enumerate(tqdm(minibatch_indices(len(unlabeled), batch_size, steps, seed), total=steps,
                                    desc="adamerging", disable=not progress, leave=False), 1):
        logits = class_logits(composer.shared(unlabeled[idx].to(device), lam), head)
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        entropy.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        if step % 50 == 0 or step == steps:
            history.append({"step": step, "entropy": entropy.item()})
    return lam.detach(), {"history": history}


