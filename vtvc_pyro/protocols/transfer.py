"""Transfer to a held-out target: compose the bank's other vectors for a data set none of them saw.

Protocol: for a target, the bank's other tasks are composed, never the target's own vector.
Learned methods train on the target's train split, pick their checkpoint on val and report test.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from ..bank.low_rank import truncate_bank
from ..bank.store import LoadedBank
from ..compose.engine import Composer
from ..config import FitConfig
from ..data.benchmarks import clip_preprocess
from ..data.specs import load_dataset, with_validation
from ..data.split import Split
from ..errors import ConfigError
from ..evaluate import classification_metrics
from ..methods import baselines
from .fitting import (
    SPLITS,
    BaselineRun,
    FitProtocol,
    Target,
    VTVCFit,
    apply_shots,
    composition_diagnostics,
    open_bank,
    paired_against,
    paired_cell,
    percent,
    run_baselines,
    score_methods,
)


def select_target(cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
    """The bank without the target's own vector, the target data set and its head; ``data`` still empty.

    Reads files only (builds the embedded bank when it is missing); no base features are computed.
    """
    full = open_bank(cfg, progress)
    data_seed = full.manifest.get("config", {}).get("seed", 0)  # pools must match those of the bank build
    task = with_validation(load_dataset(cfg.target, data_seed, preprocess=clip_preprocess(full.model)), data_seed)
    own = {cfg.target, task.name, cfg.target.removeprefix("suite:")}
    tasks = [t for t in full.vectors.tasks if t not in own]  # never the target's own vector
    own_tasks = [t for t in full.vectors.tasks if t in own]
    own_vector = full.vectors.select(own_tasks[:1]).to(device) if own_tasks else None
    vectors = full.vectors.select(tasks)
    if cfg.low_rank:  # truncated SVD of every weight matrix; the engine then composes the factors
        vectors = truncate_bank(vectors, rank=cfg.low_rank)
    bank = LoadedBank(full.path, full.manifest, full.model.to(device), vectors.to(device), full.heads)
    head = bank.head_for(task).to(device)
    if head.shape[0] != len(task.class_names):
        raise ConfigError(f"head has {head.shape[0]} classes but {cfg.target} has {len(task.class_names)}")
    return Target(cfg.target, bank, tasks, task, head, own_vector=own_vector, data_seed=data_seed)


def load_target(cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
    """:func:`select_target` with every split on ``device`` and its base features (cached under the bank)."""
    target = select_target(cfg, device, progress)
    for split in SPLITS:
        x, y = target.task.split(split)
        features = target.bank.features(target.task, split, cfg.target, progress=progress)
        target.data[split] = Split(x.to(device), features.to(device), y.to(device))
    return target


def format_transfer(metrics: dict) -> str:
    """A plain-text table: methods x (accuracy, its interval, NLL, ECE, Brier, and after temperature scaling)."""
    rows = [f"target: {metrics['target']}  ({metrics['num_test']} test images, {len(metrics['tasks'])} task vectors)",
            f"{'method':18s} {'acc %':>6s} {'95% interval':>13s} {'NLL':>7s} {'ECE %':>6s} {'Brier':>6s} "
            f"{'NLL TS':>7s} {'ECE TS %':>8s} {'acc - vtvc, points, paired 95%':>31s}"]
    for name, m in metrics["methods"].items():
        lo, hi = m.get("interval95", {}).get("accuracy", (math.nan, math.nan))
        ts = m.get("temperature_scaled", {})
        rows.append(f"{name:18s} {percent(m['accuracy']):6.1f} {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>13s} "
                    f"{m['nll']:7.3f} {percent(m['ece']):6.1f} {m['brier']:6.3f} {ts.get('nll', math.nan):7.3f} "
                    f"{percent(ts.get('ece')):8.1f} {paired_cell(m):>31s}")
    comp = metrics.get("composition", {})
    if comp:
        line = f"posterior inclusion {comp['mean_inclusion']:.3f} (sd across tasks {comp['inclusion_sd_across_tasks']:.3f})"
        if "selection" in comp:
            line += f"; selection accuracy {comp['selection']['overall']:.3f}"
        rows.append(line)
    return "\n".join(rows)


class Transfer(FitProtocol):
    """Held-out target (see the module docstring)."""

    name = "transfer"

    def label(self, cfg: FitConfig) -> str:
        return cfg.target

    def select(self, cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
        return select_target(cfg, device, progress)

    def load(self, cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
        return apply_shots(load_target(cfg, device, progress), cfg.shots, cfg.seed)

    def run_baselines(self, cfg: FitConfig, target: Target, progress: bool) -> BaselineRun:
        return BaselineRun(*run_baselines(cfg, target, baselines.expand_names(cfg.baselines, cfg.model), progress))

    def metrics(self, cfg: FitConfig, target: Target, methods: dict, baselines: BaselineRun, vtvc: VTVCFit) -> dict:
        val_y, test_y = target.data["val"].labels, target.data["test"].labels
        local = vtvc.draws.local
        scores = score_methods(methods, val_y, test_y, seed=cfg.seed)
        for name, paired in paired_against(methods, test_y, seed=cfg.seed).items():
            scores[name]["paired_vs_vtvc"] = paired
        return {"target": cfg.target, "methods": scores,
                "num_test": len(test_y), "tasks": target.tasks, "svi": vtvc.svi_summary(detailed=True),
                "composition": composition_diagnostics(vtvc.guide, local["lam"], local["inclusion"], target),
                "baselines": baselines.info}

    def score_test(self, target: Target, probs: torch.Tensor) -> dict:
        labels = target.data["test"].labels
        return {**classification_metrics(probs, labels), "where": f"the target's test split ({len(labels)} images)"}

    def describe(self, target: Target, split: str) -> str:
        return f"{target.label} {split}"

    def prediction_head(self, target: Target, task: str | None) -> tuple[torch.Tensor, list[str]]:
        return target.head, list(target.task.class_names)

    def plan(self, cfg: FitConfig) -> dict:
        if not (Path(cfg.bank) / "manifest.json").is_file():
            task = with_validation(load_dataset(cfg.target, 0), 0)
            return {"splits": {split: len(task.split(split)[1]) for split in SPLITS}}
        target = select_target(cfg, torch.device("cpu"))  # no features: they would cost forward passes and a cache write
        composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
        return {"arch": target.bank.arch, "splits": {split: len(target.task.split(split)[1]) for split in SPLITS},
                "classes": len(target.task.class_names), "tasks": target.tasks,
                "coefficients": f"{composer.num_tasks} tasks x {composer.num_groups} {cfg.granularity} groups per image",
                "composition": dict(Counter(composer.plan().values())),
                "own_vector_held_out": target.own_vector is not None}

    def format(self, metrics: dict) -> str:
        return format_transfer(metrics)
