"""Ablation grids and sweeps: targets × methods × settings × seeds, resumable.

Every finished cell is written to ``<out>/cells/<target>__<method>[__<setting>]__seed<k>.json``
(atomically) and skipped when the grid runs again, so an interrupted grid continues where it
stopped. The grid's settings are kept in ``<out>/grid.json``; a folder made with other settings is
refused rather than mixed. :func:`summarize_cells` turns the cells into ``ablation.csv``,
``ablation.md`` and ``ablation.png``.

Method names: a baseline name (``atlas``...), ``vtvc/<prior>/<guide>`` (the default model) or
``vtvc/<model>/<prior>/<guide>``.

Sweeps (``--sweep svi.kl_weight=0.01,0.1,1 --sweep prior.pi=0.1,0.3``): every VTVC method runs at
every combination of the values; a field is any :class:`~vtvc_pyro.config.FitConfig` field, dotted
for the SVI settings (``svi.lr``), and ``prior.X`` sets the prior argument X. Every cell records the
val NLL and accuracy of the method, so settings are chosen on val; the tables mark, per target and
method, the setting with the lowest mean val NLL. Baselines tune their own grids on val and run once.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import time
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import numpy as np
import yaml

from ..bayes.guide import GUIDES
from ..bayes.priors import PRIORS
from ..bayes.registry import MODELS
from ..config import ALL_BASELINES, DEFAULT_BANK, FitConfig, GridConfig, SVIConfig
from ..errors import ConfigError
from ..io import atomic_write, resolve_device, write_json
from ..methods.baselines import KNOWN_BASELINES, SEEDED_BASELINES
from ..report import new_figure, save_figure
from .fit import run_fit
from .fitting import apply_shots, run_baselines, score_methods
from .transfer import load_target

log = logging.getLogger(__name__)

METRICS = ("accuracy", "nll", "ece", "brier")


def expand_methods(methods: list[str]) -> list[str]:
    """The grid's methods with ``all`` replaced by every registered baseline, each checked (see :func:`parse_method`)."""
    out = []
    for method in methods:
        for name in (KNOWN_BASELINES if method == ALL_BASELINES else [method]):
            parse_method(name)
            if name not in out:
                out.append(name)
    return out


def parse_method(method: str) -> tuple[str, str | None, str | None, str | None]:
    """``"atlas"`` -> ``("atlas", None, None, None)``; ``"vtvc/laplace/global"`` -> ``("vtvc", "laplace",
    "global", None)`` (the default model); ``"vtvc/flat/gaussian/amortized"`` -> ``("vtvc", "gaussian",
    "amortized", "flat")``."""
    if method in KNOWN_BASELINES:
        return method, None, None, None
    parts = method.split("/")
    if len(parts) == 4 and parts[0] == "vtvc" and parts[1] in MODELS:
        model, parts = parts[1], [parts[0], *parts[2:]]
    else:
        model = None
    if len(parts) == 3 and parts[0] == "vtvc" and parts[1] in PRIORS and parts[2] in GUIDES:
        return "vtvc", parts[1], parts[2], model
    raise ConfigError(f"unknown method {method!r}: use a baseline ({', '.join(KNOWN_BASELINES)}) or vtvc/[MODEL/]PRIOR/GUIDE "
                      f"with MODEL in {', '.join(MODELS)}, PRIOR in {', '.join(PRIORS)} and GUIDE in {', '.join(GUIDES)}")


def parse_sweep(entries: list[str]) -> list[dict]:
    """``["svi.kl_weight=0.1,1", "prior.pi=0.3"]`` -> every combination as ``{field: value}`` (values
    read as YAML scalars); ``[]`` -> ``[{}]``. Unknown fields are a clear error."""
    axes = []
    for entry in entries:
        field, sep, values = entry.partition("=")
        if not sep or not field or not values:
            raise ConfigError(f"bad --sweep {entry!r}: write FIELD=V1,V2,... (e.g. svi.kl_weight=0.01,0.1,1)")
        apply_setting(FitConfig(), field, yaml.safe_load(values.split(",")[0]))  # the field exists
        axes.append([(field, yaml.safe_load(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def apply_setting(cfg: FitConfig, field: str, value) -> FitConfig:
    """Set ``field`` (``lr``-style top-level, ``svi.X`` nested, ``prior.X`` a prior argument) on ``cfg``, in place."""
    if field.startswith("prior."):
        cfg.prior_args = {**cfg.prior_args, field.removeprefix("prior."): value}
        return cfg
    obj, parts = cfg, field.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
    names = {f.name for f in fields(obj)} if is_dataclass(obj) else set()
    if parts[-1] not in names or is_dataclass(getattr(obj, parts[-1])):
        raise ConfigError(f"unknown sweep field {field!r}: use a vtvc fit setting (see vtvc fit --help), svi.X or prior.X")
    if isinstance(getattr(obj, parts[-1]), list) and not isinstance(value, list):
        value = [value]  # --sweep components=1,4: one candidate list per value
    setattr(obj, parts[-1], value)
    return cfg


def setting_label(setting: dict) -> str:
    """``{"svi.kl_weight": 0.1}`` -> ``"svi.kl_weight=0.1"`` (``""`` for the defaults)."""
    return ",".join(f"{k}={v}" for k, v in setting.items())


def cells(grid: GridConfig) -> list[tuple[str, str, int, dict]]:
    """Every ``(target, method, seed, setting)``; seed-independent baselines run once (seed 0 of the
    grid), baselines with the default setting only."""
    out = []
    settings = parse_sweep(grid.sweep)
    for target in grid.targets:
        for method in expand_methods(grid.methods):
            kind = parse_method(method)[0]
            seeds = grid.seeds if kind == "vtvc" or method in SEEDED_BASELINES else grid.seeds[:1]
            for setting in (settings if kind == "vtvc" else [{}]):
                out.extend((target, method, seed, setting) for seed in seeds)
    return out


def cell_path(out: Path, target: str, method: str, seed: int, setting: dict | None = None) -> Path:
    label = setting_label(setting or {})
    safe = f"{target}__{method}{f'__{label}' if label else ''}__seed{seed}".replace("/", "-").replace(":", "_")
    return out / "cells" / f"{safe}.json"


def prepare_grid_folder(out: Path, grid: GridConfig, overwrite: bool = False) -> None:
    """Create ``out`` or check that it holds a grid with the same settings (targets/methods/seeds may grow)."""
    saved = out / "grid.json"
    settings = asdict(grid)
    if saved.is_file() and not overwrite:
        before = json.loads(saved.read_text())
        before["bank"] = before.get("bank") or DEFAULT_BANK  # grids before 0.2 wrote null for the default bank
        fixed = ("steps", "eval_every", "eval_samples", "bank", "device")  # targets, methods, seeds, sweeps may grow
        changed = [k for k in fixed if before.get(k) != settings.get(k)]
        if changed:
            raise ConfigError(f"{out} holds a grid run with other settings ({', '.join(changed)}): "
                              "use another --out, or --overwrite to recompute its cells")
    elif saved.is_file() and overwrite:
        for f in (out / "cells").glob("*.json"):
            f.unlink()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_json(saved, settings)


def _fit_config(grid: GridConfig, target: str, seed: int, method: str, setting: dict) -> FitConfig:
    kind, prior, guide, model = parse_method(method)
    svi = SVIConfig(steps=grid.steps, eval_every=grid.eval_every, checkpoint_every=max(grid.steps, 1))
    cfg = FitConfig(target=target, bank=grid.bank, eval_samples=grid.eval_samples, device=grid.device, seed=seed,
                    svi=svi, baselines=[] if kind == "vtvc" else [method])
    if kind == "vtvc":
        cfg.prior, cfg.guide, cfg.model = prior, guide, model or cfg.model
    for field, value in setting.items():
        apply_setting(cfg, field, value)
    return cfg


def run_cell(grid: GridConfig, out: Path, target: str, method: str, seed: int, setting: dict, targets_cache: dict) -> dict:
    """Run one cell and return its record (test metrics, val NLL and accuracy, wall seconds)."""
    cfg = _fit_config(grid, target, seed, method, setting)
    cell_start = time.time()
    extra = {}
    if parse_method(method)[0] == "vtvc":
        run_dir = out / "runs" / cell_path(out, target, method, seed, setting).stem
        metrics = run_fit(cfg, run_dir, overwrite=True, progress=False)
        result, seconds = metrics["methods"]["vtvc"], metrics["timing"]["vtvc_seconds"]
        comp = metrics["composition"]
        extra = {"inclusion": comp["mean_inclusion"], "inclusion_sd_tasks": comp["inclusion_sd_across_tasks"],
                 "selection": comp.get("selection", {}).get("overall", np.nan), "components": metrics["svi"]["components"]}
    else:
        key = (target, cfg.shots, cfg.seed if cfg.shots else None)  # few-shot subsets differ by seed
        if key not in targets_cache:
            targets_cache[key] = apply_shots(load_target(cfg, resolve_device(grid.device)), cfg.shots, cfg.seed)
        tgt = targets_cache[key]
        start = time.time()
        probs, _ = run_baselines(cfg, tgt, [method])
        seconds = time.time() - start
        if method not in probs:
            return {"target": target, "method": method, "seed": seed, "setting": "", "skipped": True}
        result = score_methods(probs, tgt.data["val"].labels, tgt.data["test"].labels, seed=seed)[method]
    # seconds: the method itself; wall_seconds: the whole cell, loading and writing included
    return {"target": target, "method": method, "setting": setting_label(setting), "seed": seed,
            "val_nll": result["val"]["nll"], "val_accuracy": result["val"]["accuracy"], "seconds": round(seconds, 2),
            "wall_seconds": round(time.time() - cell_start, 2), **{k: result[k] for k in METRICS},
            **{f"{k}_lo": result["interval95"][k][0] for k in METRICS},
            **{f"{k}_hi": result["interval95"][k][1] for k in METRICS},
            **{f"ts_{k}": result["temperature_scaled"][k] for k in ("nll", "ece", "brier")}, **extra}


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
    for i, (target, method, seed, setting) in enumerate(todo, 1):
        path = cell_path(out, target, method, seed, setting)
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        if max_cells is not None and ran >= max_cells:
            left += 1
            continue
        ran += 1
        if progress:
            print(f"[{i}/{len(todo)}] {target} {method} {setting_label(setting)} seed {seed}", flush=True)
        record = run_cell(grid, out, target, method, seed, setting, cache)
        write_json(path, record)  # atomic: a killed grid never leaves half a cell
        records.append(record)
    # the tables cover every cell in the folder (this grid's first, in its order): a sweep grown by
    # several runs is summarised whole
    mine = {cell_path(out, *cell) for cell in todo}
    others = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json")) if p not in mine]
    summarize_cells(records + others, out)
    return records, left


# ---------------------------------------------------------------- tables and plot
def aggregate(records: list[dict]) -> list[dict]:
    """Mean and sd over seeds per (target, method, setting), in first-seen order; ``val_best`` marks,
    per (target, method), the setting with the lowest mean val NLL."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        if not r.get("skipped"):
            groups.setdefault((r["target"], r["method"], r.get("setting", "")), []).append(r)
    rows = []
    for (target, method, setting), rs in groups.items():
        row = {"target": target, "method": method, "setting": setting, "n": len(rs)}
        for k in (*METRICS, *(f"{m}_{e}" for m in METRICS for e in ("lo", "hi")), "ts_nll", "ts_ece", "ts_brier",
                  "val_nll", "val_accuracy", "inclusion", "inclusion_sd_tasks", "selection", "seconds"):
            values = np.array([r.get(k, np.nan) for r in rs], dtype=float)
            row[k], row[f"{k}_sd"] = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    for target, method in {(r["target"], r["method"]) for r in rows}:
        same = [r for r in rows if (r["target"], r["method"]) == (target, method)]
        best = min(same, key=lambda r: r["val_nll"] if np.isfinite(r["val_nll"]) else np.inf)
        for r in same:
            r["val_best"] = r is best and len(same) > 1
    return rows


def summarize_cells(records: list[dict], out: Path) -> list[dict]:
    """Write ``ablation.csv`` (one row per cell), ``ablation.md`` (mean ± sd) and ``ablation.png``."""
    out = Path(out)
    rows = [r for r in records if not r.get("skipped")]
    columns = ["target", "method", "setting", "seed", "val_nll", "val_accuracy", *METRICS,
               *(f"{m}_{e}" for m in METRICS for e in ("lo", "hi")), "ts_nll", "ts_ece", "ts_brier",
               "inclusion", "inclusion_sd_tasks", "selection", "components", "seconds", "wall_seconds"]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in columns} for r in rows)

    atomic_write(out / "ablation.csv", write_csv)
    table = aggregate(records)
    lines = ["| target | method | setting | val NLL | val acc. (%) | test accuracy (%) | acc. 95% CI | NLL | NLL (TS) | "
             "ECE (%) | ECE (TS, %) | Brier | inclusion | selection (%) | wall (s) | seeds |",
             "|" + "---|" * 16]
    for r in table:
        setting = (r["setting"] or "defaults") + (" **(val best)**" if r.get("val_best") else "")
        inclusion = "" if np.isnan(r["inclusion"]) else f"{r['inclusion']:.2f}"
        selection = "" if np.isnan(r["selection"]) else f"{100 * r['selection']:.0f}"
        lines.append(f"| {r['target']} | {r['method']} | {setting} | {r['val_nll']:.3f} ± {r['val_nll_sd']:.3f} | "
                     f"{100 * r['val_accuracy']:.1f} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_sd']:.1f} | "
                     f"[{100 * r['accuracy_lo']:.0f}, {100 * r['accuracy_hi']:.0f}] | "
                     f"{r['nll']:.3f} ± {r['nll_sd']:.3f} | {r['ts_nll']:.3f} | {100 * r['ece']:.1f} ± {100 * r['ece_sd']:.1f} | "
                     f"{100 * r['ts_ece']:.1f} | {r['brier']:.3f} | {inclusion} | {selection} | {r['seconds']:.1f} | {r['n']} |")
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
        ax.set_yticks(y, [r["method"] + (f" [{r['setting']}]" if r.get("setting") else "") for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(target)
    return save_figure(fig, path)
