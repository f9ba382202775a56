"""The baselines' registry: a thin wrapper per method of :mod:`.merges` and :mod:`.learned`.

Each wrapper in :data:`BASELINES` turns :class:`BaselineInputs` into test-set class
probabilities, so the protocols and ``vtvc ablate`` run any of them by name.

Protocol (as for VTVC): coefficients are chosen or learned on the target's train split, selected on
val, reported on test. AdaMerging is the exception, by design: it minimises prediction entropy on
the *unlabelled test inputs* (test-time adaptation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..bank.task_vectors import TaskVectorBank
from ..compose.engine import Composer
from ..config import ALL_BASELINES
from ..errors import ConfigError
from .learned import adamerging, learn_shared_coefficients
from .merges import (
    average_coefficients,
    choose_on_val,
    predict_shared,
    single_vector_bank,
    task_arithmetic,
    ties_merge,
    zero_coefficients,
)


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


def expand_names(names: list[str]) -> list[str]:
    """Baseline names with ``all`` replaced by every registered one; unknown names are a clear error."""
    out = []
    for name in names:
        for item in (BASELINES if name == ALL_BASELINES else [name]):
            if item not in BASELINES:
                raise ConfigError(f"unknown baseline {item!r}: choose from {', '.join(BASELINES)} (or all)")
            if item not in out:
                out.append(item)
    return out


def run_baseline(name: str, inputs: BaselineInputs) -> tuple[torch.Tensor | None, dict]:
    """Test-set class probabilities ``[N_test, C]`` (``None`` when the method does not apply) and info."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)}")
    return BASELINES[name](inputs)
