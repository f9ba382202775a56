"""Ablation grids: targets × methods (baselines, VTVC prior/guide variants) × seeds, resumable.

Every finished cell is written to ``<out>/cells/<target>__<method>__seed<k>.json`` (atomically) and
skipped when the grid runs again, so an interrupted grid continues where it stopped. The grid's
settings are kept in ``<out>/grid.json``; a folder made with other settings is refused rather than
mixed. :func:`summarize_cells` turns the cells into ``ablation.csv``, ``ablation.md`` and
``ablation.png``.

Method names: a baseline name (``atlas``...) or ``vtvc/<prior>/<guide>``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..bayes.guide import GUIDES
from ..bayes.priors import PRIORS
from ..config import ALL_BASELINES, DEFAULT_BANK, FitConfig, GridConfig, SVIConfig
from ..errors import ConfigError
from ..evaluate import classification_metrics
from ..io import atomic_write, resolve_device, write_json
from ..methods.baselines import BASELINES, SEEDED_BASELINES
from ..report import new_figure, save_figure
from .transfer import load_target, run_baselines, run_fit

log = logging.getLogger(__name__)

METRICS = ("accuracy", "nll", "ece", "brier")


def expand_methods(methods: list[str]) -> list[str]:
    """The grid's methods with ``all`` replaced by every registered baseline, each checked (see :func:`parse_method`)."""
    out = []
    for method in methods:
        for name in (BASELINES if method == ALL_BASELINES else [method]):
            parse_method(name)
            if name not in out:
                out.append(name)
    return out


def parse_method(method: str) -> tuple[str, str | None, str | None]:
    """``"atlas"`` -> ``("atlas", None, None)``; ``"vtvc/laplace/global"`` -> ``("vtvc", "laplace", "global")``."""
    if method in BASELINES:
        return method, None, None
    parts = method.split("/")
    if len(parts) == 3 and parts[0] == "vtvc" and parts[1] in PRIORS and parts[2] in GUIDES:
        return "vtvc", parts[1], parts[2]
    raise ConfigError(f"unknown method {method!r}: use a baseline ({', '.join(BASELINES)}) or vtvc/PRIOR/GUIDE "
                      f"with PRIOR in {', '.join(PRIORS)} and GUIDE in {', '.join(GUIDES)}")


def cells(grid: GridConfig) -> list[tuple[str, str, int]]:
    """Every ``(target, method, seed)``; seed-independent baselines run once (seed 0 of the grid)."""
    out = []
    for target in grid.targets:
        for method in expand_methods(grid.methods):
            kind = parse_method(method)[0]
            seeds = grid.seeds if kind == "vtvc" or method in SEEDED_BASELINES else grid.seeds[:1]
            out.extend((target, method, seed) for seed in seeds)
    return out


def cell_path(out: Path, target: str, method: str, seed: int) -> Path:
    safe = f"{target}__{method}__seed{seed}".replace("/", "-").replace(":", "_")
    return out / "cells" / f"{safe}.json"


def prepare_grid_folder(out: Path, grid: GridConfig, overwrite: bool = False) -> None:
    """Create ``out`` or check that it holds a grid with the same settings (targets/methods/seeds may grow)."""
    saved = out / "grid.json"
    settings = asdict(grid)
    if saved.is_file() and not overwrite:
        before = json.loads(saved.read_text())
        before["bank"] = before.get("bank") or DEFAULT_BANK  # grids before 0.2 wrote null for the default bank
        fixed = ("steps", "eval_every", "eval_samples", "bank", "device")
        changed = [k for k in fixed if before.get(k) != settings.get(k)]
        if changed:
            raise ConfigError(f"{out} holds a grid run with other settings ({', '.join(changed)}): "
                              "use another --out, or --overwrite to recompute its cells")
    elif saved.is_file() and overwrite:
        for f in (out / "cells").glob("*.json"):
            f.unlink()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_json(saved, settings)


def _fit_config(grid: GridConfig, target: str, seed: int, prior: str = "spike_slab", guide: str = "amortized_gated",
                baselines: list | None = None) -> FitConfig:
    svi = SVIConfig(steps=grid.steps, eval_every=grid.eval_every, checkpoint_every=max(grid.steps, 1))
    return FitConfig(target=target, bank=grid.bank, prior=prior, guide=guide, eval_samples=grid.eval_samples,
                     device=grid.device, seed=seed, svi=svi, baselines=baselines or [])


def run_cell(grid: GridConfig, out: Path, target: str, method: str, seed: int, targets_cache: dict) -> dict:
    """Run one cell and return its record (metrics of the test split and wall seconds)."""
    kind, prior, guide = parse_method(method)
    cell_start = time.time()
    if kind == "vtvc":
        cfg = _fit_config(grid, target, seed, prior, guide)
        run_dir = out / "runs" / cell_path(out, target, method, seed).stem
        metrics = run_fit(cfg, run_dir, overwrite=True, progress=False)
        result, seconds = metrics["methods"]["vtvc"], metrics["timing"]["vtvc_seconds"]
    else:
        cfg = _fit_config(grid, target, seed, baselines=[method])
        if target not in targets_cache:
            targets_cache[target] = load_target(cfg, resolve_device(grid.device))
        tgt = targets_cache[target]
        start = time.time()
        probs, _ = run_baselines(cfg, tgt, [method])
        seconds = time.time() - start
        if method not in probs:
            return {"target": target, "method": method, "seed": seed, "skipped": True}
        result = classification_metrics(probs[method], tgt.data["test"][2])
    # seconds: the method itself; wall_seconds: the whole cell, loading and writing included
    return {"target": target, "method": method, "seed": seed, "seconds": round(seconds, 2),
            "wall_seconds": round(time.time() - cell_start, 2), **{k: result[k] for k in METRICS}}


def run_grid(grid: GridConfig, out: str | Path, overwrite: bool = False, progress: bool = True,
             max_cells: int | None = None) -> tuple[list[dict], int]:
    """Run the unfinished cells of ``grid`` into ``out`` (at most ``max_cells`` of them, e.g. to fit a
    time-limited job; run again to continue).

    Returns:
        the finished cells' records and the number of cells still to run.
    """
    grid.validate()
    out = Path(out)
    prepare_grid_folder(out, grid, overwrite)
    todo = cells(grid)
    cache: dict = {}
    records, ran, left = [], 0, 0
    for i, (target, method, seed) in enumerate(todo, 1):
        path = cell_path(out, target, method, seed)
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        if max_cells is not None and ran >= max_cells:
            left += 1
            continue
        ran += 1
        if progress:
            print(f"[{i}/{len(todo)}] {target} {method} seed {seed}", flush=True)
        record = run_cell(grid, out, target, method, seed, cache)
        write_json(path, record)  # atomic: a killed grid never leaves half a cell
        records.append(record)
    summarize_cells(records, out)
    return records, left


# ---------------------------------------------------------------- tables and plot
def aggregate(records: list[dict]) -> list[dict]:
    """Mean and sd over seeds per (target, method), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if not r.get("skipped"):
            groups.setdefault((r["target"], r["method"]), []).append(r)
    rows = []
    for (target, method), rs in groups.items():
        row = {"target": target, "method": method, "n": len(rs)}
        for k in (*METRICS, "seconds"):
            values = np.array([r[k] for r in rs], dtype=float)
            row[k], row[f"{k}_sd"] = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def summarize_cells(records: list[dict], out: Path) -> list[dict]:
    """Write ``ablation.csv`` (one row per cell), ``ablation.md`` (mean ± sd) and ``ablation.png``."""
    out = Path(out)
    rows = [r for r in records if not r.get("skipped")]
    fields = ["target", "method", "seed", *METRICS, "seconds", "wall_seconds"]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in fields} for r in rows)

    atomic_write(out / "ablation.csv", write_csv)
    table = aggregate(records)
    lines = ["| target | method | accuracy (%) | NLL | ECE (%) | wall (s) | seeds |", "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['target']} | {r['method']} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_sd']:.1f} | "
                     f"{r['nll']:.3f} ± {r['nll_sd']:.3f} | {100 * r['ece']:.1f} ± {100 * r['ece_sd']:.1f} | "
                     f"{r['seconds']:.1f} | {r['n']} |")
    text = "\n".join(lines) + "\n"
    atomic_write(out / "ablation.md", lambda tmp: tmp.write_text(text))
    plot_ablation(table, out / "ablation.png")
    return table


def plot_ablation(table: list[dict], path: Path) -> Path:
    """Accuracy (mean ± sd over seeds) per method, one panel per target."""
    targets = list(dict.fromkeys(r["target"] for r in table))
    fig, axes = new_figure(1, len(targets), figsize=(6 * len(targets), 0.35 * max(8, len(table) / len(targets)) + 1.5),
                             squeeze=False)
    for ax, target in zip(axes[0], targets):
        rows = [r for r in table if r["target"] == target]
        y = np.arange(len(rows))
        colors = ["tab:blue" if r["method"].startswith("vtvc") else "tab:grey" for r in rows]
        ax.barh(y, [100 * r["accuracy"] for r in rows], xerr=[100 * r["accuracy_sd"] for r in rows], color=colors)
        ax.set_yticks(y, [r["method"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(target)
    return save_figure(fig, path)
