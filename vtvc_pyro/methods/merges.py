"""Training-free merges and their evaluation: zero-shot, averaging, task arithmetic (λ on val), TIES.

Each method is a pure function returning what it chose (coefficients ``[T, G]`` or a merged
vector); :func:`predict_shared` evaluates any batch-shared coefficients.
"""

from __future__ import annotations

import logging

import torch

from ..bank.task_vectors import TaskVectorBank
from ..compose.engine import Composer
from ..compose.heads import class_logits
from ..data.split import Split
from ..errors import ConfigError
from ..progress import track

log = logging.getLogger(__name__)

__all__ = ["class_logits", "predict_shared", "accuracy", "nll", "zero_coefficients", "average_coefficients",
           "choose_on_val", "task_arithmetic", "ties_merge", "single_vector_bank"]


@torch.no_grad()
def predict_shared(composer: Composer, head: torch.Tensor, images: torch.Tensor, lam: torch.Tensor,
                   batch_size: int = 512, classes: torch.Tensor | None = None, progress: bool = False,
                   desc: str = "predict") -> torch.Tensor:
    """Class probabilities ``[N, C]`` of the tower composed with shared ``lam [T, G]``
    (``classes [N, C]`` bool: each image's class set, as in task addition; ``None``: all).
    ``progress``: show the batches (:func:`~vtvc_pyro.progress.track`, named ``desc``)."""
    out = [torch.softmax(class_logits(composer.shared(images[i : i + batch_size], lam), head,
                                      None if classes is None else classes[i : i + batch_size]), -1)
           for i in track(range(0, len(images), batch_size), desc, enabled=progress, leave=False)]
    return torch.cat(out)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(-1) == labels.to(probs.device)).float().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``labels [N]`` under ``probs [N, C]``."""
    return float(-probs.gather(-1, labels.to(probs.device)[:, None]).clamp_min(1e-12).log().mean())


def zero_coefficients(composer: Composer, device) -> torch.Tensor:
    """Zero-shot is the base model: all coefficients zero, ``[T, G]``."""
    return torch.zeros(composer.num_tasks, composer.num_groups, device=device)


def average_coefficients(composer: Composer, device) -> torch.Tensor:
    """Simple averaging (model soup of the fine-tuned models): every λ = 1/T, ``[T, G]``."""
    return torch.full((composer.num_tasks, composer.num_groups), 1.0 / composer.num_tasks, device=device)


def choose_on_val(composer: Composer, head: torch.Tensor, val: Split, grid: torch.Tensor,
                  direction: torch.Tensor | None = None, progress: bool = False,
                  desc: str = "λ grid") -> tuple[torch.Tensor, dict]:
    """The ``value · direction`` with the lowest val NLL over ``grid`` (direction: all ones ``[T, G]`` by default).

    ``val``: its ``classes`` (when set) restrict each image to its own head. Returns ``lam [T, G]`` and the val NLL and accuracy per
    grid value (ties: the first in grid order). ``progress``: show the grid (named ``desc``).
    """
    direction = torch.ones(composer.num_tasks, composer.num_groups, device=head.device) if direction is None else direction
    probs = {round(v, 4): predict_shared(composer, head, val.images, v * direction, classes=val.classes)
             for v in track(grid.tolist(), desc, enabled=progress)}
    nlls = {v: nll(p, val.labels) for v, p in probs.items()}
    best = min(nlls, key=nlls.get)
    return best * direction, {"valnll_by_lambda": nlls,
                              "valaccuracy_by_lambda": {v: accuracy(p, val.labels) for v, p in probs.items()}, "lambda": best}


def task_arithmetic(composer: Composer, head: torch.Tensor, val: Split,
                    grid: torch.Tensor | None = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """One λ for the sum of all task vectors, chosen on val from ``grid`` (default 0, 0.05, ..., 1).

    ``composer`` must have ``task`` granularity. Returns ``lam [T, 1]`` and the val scores per λ.
    """
    return choose_on_val(composer, head, val, torch.linspace(0, 1, 21) if grid is None else grid,
                         progress=progress, desc="task arithmetic λ")


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


