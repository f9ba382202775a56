"""The baselines' registry: a thin wrapper per method of :mod:`.merges` and :mod:`.learned`.

Each wrapper in :data:`BASELINES` turns :class:`BaselineInputs` into a composer and the shared
coefficients it chose; :func:`run_baseline` scores them on val and test, so the protocols and
``vtvc ablate`` run any of them by name (val probabilities are what temperature scaling is fitted on).

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
from ..config import ALL_BASELINES, TWIN
from ..data.split import Split
from ..errors import ConfigError
from .learned import ATLAS_LR, tuned_adamerging, tuned_shared_coefficients
from .merges import (
    average_coefficients,
    choose_on_val,
    predict_shared,
    single_vector_bank,
    task_arithmetic,
    ties_merge,
    zero_coefficients,
)

TIES_DENSITIES = (0.1, 0.2, 0.5)
"""TIES's trim densities (the paper's default 0.2 and one on each side), chosen on val with λ."""


# ---------------------------------------------------------------- registry of thin wrappers
@dataclass
class BaselineInputs:
    """Everything a baseline may read. Tensors on one device.

    Args:
        visual: the base open_clip image tower.
        vectors: the task vectors to compose (the target's own excluded).
        head: ``[C, D]`` zero-shot head of the target (logit scale included); in task addition the
            stacked heads of every task (:class:`~vtvc_pyro.compose.heads.TaskHeads`).
        train, val: the learning and selection splits (their ``classes [N, C]`` in task addition:
            each image's own head within the stacked ones).
        test_images: ``[N_test, 3, H, W]`` (AdaMerging adapts on them, without labels).
        test_classes: ``[N_test, C]`` bool or ``None``, as for ``train``.
        own_vector: a one-task bank with the target's own fine-tuned vector, when the bank has it.
        steps, batch_size, eval_every, seed: the budget of the learned methods.
        lr_factors: the learning-rate grid of the supervised learned methods, as factors of each
            one's base rate (aTLAS: 5e-2); the lowest val NLL wins. AdaMerging keeps its own grid.
    """

    visual: torch.nn.Module
    vectors: TaskVectorBank
    head: torch.Tensor
    train: Split
    val: Split
    test_images: torch.Tensor
    test_classes: torch.Tensor | None = None
    own_vector: TaskVectorBank | None = None
    steps: int = 600
    batch_size: int = 64
    eval_every: int = 50
    seed: int = 0
    lr_factors: tuple[float, ...] = (1.0,)
    progress: bool = False

    def composer(self, granularity: str, vectors: TaskVectorBank | None = None) -> Composer:
        return Composer(self.visual, self.vectors if vectors is None else vectors, granularity)


def _zeroshot(inp: BaselineInputs):
    c = inp.composer("task")
    return c, zero_coefficients(c, inp.head.device), {}


def _own_finetuned(inp: BaselineInputs):
    if inp.own_vector is None:
        return None, None, {"skipped": "the bank has no fine-tuned vector of the target"}
    return inp.composer("task", inp.own_vector), torch.ones(1, 1, device=inp.head.device), {}


def _averaging(inp: BaselineInputs):
    c = inp.composer("task")
    return c, average_coefficients(c, inp.head.device), {}


def _task_arithmetic(inp: BaselineInputs):
    c = inp.composer("task")
    lam, info = task_arithmetic(c, inp.head, inp.val, progress=inp.progress)
    return c, lam, info


def _ties(inp: BaselineInputs):
    dense = inp.vectors.to_dense() if hasattr(inp.vectors, "to_dense") else inp.vectors  # a low-rank bank
    best = None
    for density in TIES_DENSITIES:  # density and λ chosen together by val NLL
        c = inp.composer("task", single_vector_bank(dense, ties_merge(dense, density), "ties"))
        lam, info = choose_on_val(c, inp.head, inp.val, torch.linspace(0, 2, 21), progress=inp.progress,
                                  desc=f"ties density {density:g} λ")
        score = info["valnll_by_lambda"][info["lambda"]]
        if best is None or score < best[0]:
            best = (score, c, lam, {**info, "density": density})
    return best[1:]


def _atlas(inp: BaselineInputs):
    c = inp.composer("block")
    lam, info = tuned_shared_coefficients(c, inp.head, inp.train, inp.val, lrs=tuple(ATLAS_LR * f for f in inp.lr_factors),
                                          steps=inp.steps, batch_size=inp.batch_size, eval_every=inp.eval_every,
                                          seed=inp.seed, progress=inp.progress)
    return c, lam, info


def _adamerging(inp: BaselineInputs):
    c = inp.composer("layer")
    lam, info = tuned_adamerging(c, inp.head, inp.test_images, inp.val, steps=inp.steps, batch_size=inp.batch_size,
                                 seed=inp.seed, progress=inp.progress, classes=inp.test_classes)
    return c, lam, {**info, "lambda_mean": float(lam.mean())}


BASELINES: dict[str, Callable[[BaselineInputs], tuple]] = {
    "zeroshot": _zeroshot,
    "finetuned": _own_finetuned,
    "averaging": _averaging,
    "task_arithmetic": _task_arithmetic,
    "ties": _ties,
    "atlas": _atlas,
    "adamerging": _adamerging,
}
PROTOCOL_BASELINES = {
    "router": "VTVC's amortized network as a deterministic per-sample router, trained by maximum likelihood "
              "(vtvc_pyro.bayes.router; the protocols run it): the hierarchical model's twin",
    "flat_twin": "the flat model's amortized guide as a deterministic per-sample point estimate, trained by "
                 "maximum likelihood with the router's search (vtvc_pyro.bayes.router.make_flat_twin)",
}
"""Baselines that need the Bayesian layer's network and are run by the protocols, not by :func:`run_baseline`."""
SEEDED_BASELINES = ("atlas", "adamerging", "router", "flat_twin")  # the others do not depend on the seed
KNOWN_BASELINES = (*BASELINES, *PROTOCOL_BASELINES)


def expand_names(names: list[str], model: str = "hierarchical") -> list[str]:
    """Baseline names with ``all`` replaced by every known one and ``twin`` by the ``model``'s
    deterministic twin (``router`` or ``flat_twin``); unknown names are a clear error."""
    out = []
    twin = "flat_twin" if model == "flat" else "router"
    for name in names:
        for item in (KNOWN_BASELINES if name == ALL_BASELINES else [twin if name == TWIN else name]):
            if item not in KNOWN_BASELINES:
                raise ConfigError(f"unknown baseline {item!r}: choose from {', '.join(KNOWN_BASELINES)} "
                                  f"(or all, or {TWIN}: VTVC's deterministic twin)")
            if item not in out:
                out.append(item)
    return out


def run_baseline(name: str, inputs: BaselineInputs) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """``{"val": [N_val, C], "test": [N_test, C]}`` class probabilities (``None`` when the method does
    not apply) and what the method chose."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)}")
    composer, lam, info = BASELINES[name](inputs)
    if composer is None:
        return None, info
    probs = {"val": predict_shared(composer, inputs.head, inputs.val.images, lam, classes=inputs.val.classes,
                                   progress=inputs.progress, desc=f"{name} val"),
             "test": predict_shared(composer, inputs.head, inputs.test_images, lam, classes=inputs.test_classes,
                                    progress=inputs.progress, desc=f"{name} test")}
    return probs, info
