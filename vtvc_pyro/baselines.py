"""Baselines on the same task vectors and data as VTVC.

Each method is a pure function returning what it learned (coefficients, or a merged vector), plus
:func:`predict_shared` to evaluate any batch-shared coefficients. A thin wrapper per method in
:data:`BASELINES` turns :class:`BaselineInputs` into test-set class probabilities, so the pipeline
and ``scripts/ablate.py`` run any of them by name.

Protocol (as for VTVC): coefficients are chosen or learned on the target's train split, selected on
val, reported on test. AdaMerging is the exception, by design: it minimises prediction entropy on
the *unlabelled test inputs* (test-time adaptation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .composition import Composer
from .errors import ConfigError
from .infer import minibatch_indices
from .task_vectors import TaskVectorBank

log = logging.getLogger(__name__)


def class_logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Zero-shot logits: ``features [N, D]``, ``head [C, D]`` (logit scale included) -> ``[N, C]``."""
    return F.normalize(features, dim=-1) @ head.T


@torch.no_grad()
def predict_shared(composer: Composer, head: torch.Tensor, images: torch.Tensor, lam: torch.Tensor,
                   batch_size: int = 512) -> torch.Tensor:
    """Class probabilities ``[N, C]`` of the tower composed with shared ``lam [T, G]``."""
    out = [torch.softmax(class_logits(composer.shared(images[i : i + batch_size], lam), head), -1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(-1) == labels.to(probs.device)).float().mean())


# ---------------------------------------------------------------- pure methods
def zero_coefficients(composer: Composer, device) -> torch.Tensor:
    """Zero-shot is the base model: all coefficients zero, ``[T, G]``."""
    return torch.zeros(composer.num_tasks, composer.num_groups, device=device)


def average_coefficients(composer: Composer, device) -> torch.Tensor:
    """Simple averaging (model soup of the fine-tuned models): every λ = 1/T, ``[T, G]``."""
    return torch.full((composer.num_tasks, composer.num_groups), 1.0 / composer.num_tasks, device=device)


def choose_on_val(composer: Composer, head: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
                  grid: torch.Tensor, direction: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The best ``value · direction`` on val over ``grid`` (direction: all ones ``[T, G]`` by default).

    Returns ``lam [T, G]`` and the val accuracy per grid value (ties: the first in grid order).
    """
    direction = torch.ones(composer.num_tasks, composer.num_groups, device=head.device) if direction is None else direction
    scores = {round(v, 4): _accuracy(predict_shared(composer, head, val[0], v * direction), val[1]) for v in grid.tolist()}
    best = max(scores, key=scores.get)
    return best * direction, {"val_accuracy_by_lambda": scores, "lambda": best}


def task_arithmetic(composer: Composer, head: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
                    grid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One λ for the sum of all task vectors, chosen on val from ``grid`` (default 0, 0.05, ..., 1).

    ``composer`` must have ``task`` granularity. Returns ``lam [T, 1]`` and the val accuracy per λ.
    """
    return choose_on_val(composer, head, val, torch.linspace(0, 1, 21) if grid is None else grid)


def ties_merge(bank: TaskVectorBank, density: float = 0.2) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al., 2023) of a bank's vectors into one: trim, elect sign, disjoint mean.

    1. Trim: each task keeps its ``density`` fraction of largest-magnitude entries over all its blocks.
    2. Elect: per entry, the sign of the summed trimmed values (the sign with more total mass).
    3. Disjoint merge: the mean of the trimmed values that agree with the elected sign.

    Returns:
        block name -> merged delta ``[*shape]`` (fp32).
    """
    if not 0 < density <= 1:
        raise ConfigError(f"TIES density must lie in (0, 1], got {density}")
    names = list(bank.deltas)
    flat = torch.cat([bank.deltas[n].float().flatten(1) for n in names], dim=1)  # [T, P]
    keep = max(1, int(round(density * flat.shape[1])))
    threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values  # [T, 1]
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))  # [P]
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    out, start = {}, 0
    for n in names:
        shape = bank.deltas[n].shape[1:]
        size = shape.numel()
        out[n] = merged[start : start + size].reshape(shape)
        start += size
    return out


def single_vector_bank(bank: TaskVectorBank, deltas: dict[str, torch.Tensor], name: str) -> TaskVectorBank:
    """A one-task bank holding ``deltas`` (e.g. a merged vector) on ``bank``'s base."""
    return TaskVectorBank(bank.arch, [name], bank.base, {k: v[None] for k, v in deltas.items()}, bank.base_fingerprint)


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
            acc = _accuracy(predict_shared(composer, head, val[0].to(device), lam.detach()), val[1])
            history.append({"step": step, "loss": loss.item(), "val_accuracy": acc})
            if acc > best[0]:
                best = (acc, lam.detach().clone(), step)
    return best[1], {"history": history, "best_step": best[2], "best_val_accuracy": best[0]}


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


# ---------------------------------------------------------------- registry of thin wrappers
@dataclass
class BaselineInputs:
    """Everything a baseline may read. Tensors on one device.

    Args:
        visual: the base open_clip image tower.
        vectors: the task vectors to compose (the target's own excluded).
        head: ``[C, D]`` zero-shot head of the target (logit scale included).
        train, val: ``(images [N, 3, H, W], labels [N])``.
        test_images: ``[N_test, 3, H, W]`` (AdaMerging adapts on them, without labels).
        own_vector: a one-task bank with the target's own fine-tuned vector, when the bank has it.
        steps, batch_size, lr, eval_every, seed: for the learned methods (lr: aTLAS's).
    """

    visual: torch.nn.Module
    vectors: TaskVectorBank
    head: torch.Tensor
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test_images: torch.Tensor
    own_vector: TaskVectorBank | None = None
    steps: int = 600
    batch_size: int = 64
    lr: float = 5e-2
    eval_every: int = 50
    seed: int = 0
    progress: bool = False

    def composer(self, granularity: str, vectors: TaskVectorBank | None = None) -> Composer:
        return Composer(self.visual, self.vectors if vectors is None else vectors, granularity)


def _zeroshot(inp: BaselineInputs):
    c = inp.composer("task")
    return predict_shared(c, inp.head, inp.test_images, zero_coefficients(c, inp.head.device)), {}


def _own_finetuned(inp: BaselineInputs):
    if inp.own_vector is None:
        return None, {"skipped": "the bank has no fine-tuned vector of the target"}
    c = inp.composer("task", inp.own_vector)
    return predict_shared(c, inp.head, inp.test_images, torch.ones(1, 1, device=inp.head.device)), {}


def _averaging(inp: BaselineInputs):
    c = inp.composer("task")
    return predict_shared(c, inp.head, inp.test_images, average_coefficients(c, inp.head.device)), {}


def _task_arithmetic(inp: BaselineInputs):
    c = inp.composer("task")
    lam, info = task_arithmetic(c, inp.head, inp.val)
    return predict_shared(c, inp.head, inp.test_images, lam), info


def _ties(inp: BaselineInputs):
    dense = inp.vectors.to_dense() if hasattr(inp.vectors, "to_dense") else inp.vectors  # a low-rank bank
    c = inp.composer("task", single_vector_bank(dense, ties_merge(dense), "ties"))
    lam, info = choose_on_val(c, inp.head, inp.val, torch.linspace(0, 2, 21))
    return predict_shared(c, inp.head, inp.test_images, lam), {**info, "density": 0.2}


def _atlas(inp: BaselineInputs):
    c = inp.composer("block")
    lam, info = learn_shared_coefficients(c, inp.head, inp.train, inp.val, steps=inp.steps, batch_size=inp.batch_size,
                                          lr=inp.lr, eval_every=inp.eval_every, seed=inp.seed, progress=inp.progress)
    return predict_shared(c, inp.head, inp.test_images, lam), info


def _adamerging(inp: BaselineInputs):
    c = inp.composer("layer")
    lam, info = adamerging(c, inp.head, inp.test_images, steps=inp.steps, batch_size=inp.batch_size, seed=inp.seed,
                           progress=inp.progress)
    return predict_shared(c, inp.head, inp.test_images, lam), {**info, "lambda_mean": float(lam.mean())}


BASELINES: dict[str, Callable[[BaselineInputs], tuple[torch.Tensor | None, dict]]] = {
    "zeroshot": _zeroshot,
    "finetuned": _own_finetuned,
    "averaging": _averaging,
    "task_arithmetic": _task_arithmetic,
    "ties": _ties,
    "atlas": _atlas,
    "adamerging": _adamerging,
}
SEEDED_BASELINES = ("atlas", "adamerging")  # the others do not depend on the seed


def run_baseline(name: str, inputs: BaselineInputs) -> tuple[torch.Tensor | None, dict]:
    """Test-set class probabilities ``[N_test, C]`` (``None`` when the method does not apply) and info."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)}")
    return BASELINES[name](inputs)
