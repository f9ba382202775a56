"""Results tables of run folders: methods × tasks (+ average and normalized average), Markdown and CSV.

Works for both protocols, from ``metrics.json`` alone:

* task addition: one column per task, then ``average`` and ``normalized`` (accuracy ÷ the task's
  own fine-tuned accuracy, averaged); runs with the same tasks (seeds) are averaged, ``± sd``;
* transfer: one column per target (each run is one), then ``average``;
* both: ``vs vtvc`` (:data:`PAIRED`), the paired difference of each method's (average) accuracy
  against VTVC's on the same test images, in points, mean ± sd over runs; each run's 95 % interval
  is in its ``metrics.json`` (``methods.<m>.paired_vs_vtvc``) and in the run's printed table.

Reference rows come from :data:`PUBLISHED` (``vtvc_pyro/published/task_addition.json``): published
accuracies of CLIP on the 8 standard data sets, each row labelled with its source. They are shown
for the data sets the runs have (matched by name) when ``reference`` names a model (``ViT-B-32``).

Usage::

    table = results_table(["runs/add/s0", "runs/add/s1"], reference="ViT-B-32")
    print(to_markdown(table))
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import ConfigError
from .run_folder import RunFolder

PUBLISHED = "published/task_addition.json"

PAIRED = "vs vtvc"
"""The column of the paired accuracy difference against VTVC (points)."""

SUMMARY_COLUMNS = ("average", "normalized", PAIRED)
"""Columns that are not data sets."""


@dataclass
class Table:
    """``rows``: ``(label, source, cells)``, each cell ``(mean, sd, n)`` in % or ``None``."""

    columns: list[str]
    rows: list[tuple[str, str, list[tuple[float, float, int] | None]]] = field(default_factory=list)
    title: str = ""


def published_numbers() -> dict:
    """The shipped JSON of published numbers: ``{"sources", "datasets", "rows"}``."""
    return json.loads(resources.files("vtvc_pyro").joinpath(PUBLISHED).read_text())


def _read_metrics(run_dir: str | Path) -> dict:
    return RunFolder(run_dir).read_metrics()


def _stats(values: list[float]) -> tuple[float, float, int] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd, len(values)


def _addition_cells(runs: list[dict], tasks: list[str]) -> dict[str, dict[str, list[float]]]:
    """method -> column -> values over runs (accuracy %)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for m in runs:
        for name, scores in m["methods"].items():
            col = cells.setdefault(name, {})
            for task in tasks:
                col.setdefault(task, []).append(100 * scores["per_task"][task]["accuracy"])
            col.setdefault("average", []).append(100 * scores["average"]["accuracy"])
            norm = scores.get("normalized_average")
            col.setdefault("normalized", []).append(100 * norm if norm is not None else math.nan)
            _add_paired(col, scores)
    return cells


def _add_paired(col: dict[str, list[float]], scores: dict) -> None:
    """The run's paired accuracy difference against VTVC (points) into the ``vs vtvc`` column, when it has one."""
    paired = scores.get("paired_vs_vtvc", {}).get("accuracy")
    if paired is not None:
        col.setdefault(PAIRED, []).append(100 * paired["difference"])


def _transfer_cells(runs: list[dict]) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    targets = list(dict.fromkeys(m["target"] for m in runs))
    cells: dict[str, dict[str, list[float]]] = {}
    for m in runs:
        for name, scores in m["methods"].items():
            cells.setdefault(name, {}).setdefault(m["target"], []).append(100 * scores["accuracy"])
            _add_paired(cells[name], scores)
    for col in cells.values():  # the average over targets of the per-target means
        means = [sum(v) / len(v) for t, v in col.items() if t in targets]
        col["average"] = [sum(means) / len(means)] if len(means) == len(targets) else []
    return targets, cells


def _dataset_key(name: str) -> str:
    return name.lower().removesuffix("val").replace("-", "").replace("_", "")


def reference_rows(columns: list[str], model: str) -> list[tuple[str, str, list]]:
    """Published rows of ``model`` for the data-set columns among ``columns`` (others: ``None``)."""
    published = published_numbers()
    rows = []
    for row in published["rows"]:
        if row["model"] != model:
            continue
        per_task = {_dataset_key(k): v for k, v in row.get("per_task", {}).items()}
        datasets = [c for c in columns if c not in SUMMARY_COLUMNS]
        complete = all(_dataset_key(c) in per_task for c in datasets) and len(datasets) == len(per_task)
        cells = []
        for col in columns:
            if col == "average":  # a published average is over its own data sets: shown only for the same ones
                value = row.get("average") if complete or not per_task and len(datasets) == 8 else None
            else:
                value = per_task.get(_dataset_key(col))
            cells.append(None if value is None else (float(value), 0.0, 1))
        if any(c is not None for col, c in zip(columns, cells) if col not in SUMMARY_COLUMNS):
            rows.append((f"{row['method']} (published, {row['source']})", f"{row['source']}: {row['checkpoints']}",
                         cells))
    return rows


def results_table(run_dirs: list[str | Path], reference: str | None = None) -> Table:
    """The table of ``run_dirs`` (all addition runs, or all transfer runs); see the module docstring."""
    runs = [_read_metrics(d) for d in run_dirs]
    if not runs:
        raise ConfigError("pass at least one run folder")
    # by the layout of metrics.json, not through the protocol registry: tables sit below protocols/
    protocols = {m.get("protocol", "transfer") for m in runs}
    if len(protocols) > 1:
        raise ConfigError("mix of addition and transfer runs: make one table per protocol")
    if protocols == {"addition"}:
        tasks = runs[0]["tasks"]
        if any(m["tasks"] != tasks for m in runs):
            raise ConfigError("the addition runs have different task lists: make one table per task list")
        columns = [*tasks, "average", "normalized", PAIRED]
        cells = _addition_cells(runs, tasks)
        title = f"task addition, {len(tasks)} tasks, {len(runs)} run(s): test accuracy %, mean ± sd over runs"
    else:
        targets, cells = _transfer_cells(runs)
        columns = [*targets, "average", PAIRED]
        title = f"held-out transfer, {len(targets)} target(s), {len(runs)} run(s): test accuracy %, mean ± sd over runs"
    table = Table(columns, title=title)
    for name, col in cells.items():
        table.rows.append((name, "this run" if len(runs) == 1 else "these runs",
                           [_stats(col.get(c, [])) for c in columns]))
    if reference:
        table.rows.extend(reference_rows(columns, reference))
    return table


def _cell(cell) -> str:
    if cell is None:
        return "—"
    mean, sd, n = cell
    return f"{mean:.1f} ± {sd:.1f}" if n > 1 else f"{mean:.1f}"


def to_markdown(table: Table) -> str:
    """The table as GitHub Markdown (a caption line, then the grid; sources under it)."""
    lines = [f"{table.title}", "", "| method | " + " | ".join(table.columns) + " |",
             "|---|" + "---:|" * len(table.columns)]
    for label, _, cells in table.rows:
        lines.append(f"| {label} | " + " | ".join(_cell(c) for c in cells) + " |")
    sources = sorted({src for label, src, _ in table.rows if "(published" in label})
    if sources:
        lines += ["", "Published rows: " + "; ".join(sources) + " (vtvc_pyro/published/task_addition.json)."]
    return "\n".join(lines)


def to_csv(table: Table) -> str:
    """The table as CSV: ``method, source``, then ``<column>_mean, <column>_sd`` per column, and ``runs``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "source", *[f"{c}_{s}" for c in table.columns for s in ("mean", "sd")], "runs"])
    for label, source, cells in table.rows:
        values = []
        for cell in cells:
            values += ["", ""] if cell is None else [f"{cell[0]:.4f}", f"{cell[1]:.4f}"]
        n = max((c[2] for c in cells if c is not None), default=0)
        writer.writerow([label, source, *values, n])
    return buffer.getvalue()


# ---------------------------------------------------------------- data-efficiency curves
CURVE_METHODS = ("vtvc", "router", "flat_twin", "atlas", "zeroshot")
"""The methods a data-efficiency curve follows, where the runs have them (not ``vtvc_mean`` or
``vtvc_mc``: a run keeps the one of the two that lost on val, so their rows would be biased)."""


def layout_scores(scores: dict) -> dict:
    """A method's scores (or its ``val`` scores) in either metrics layout: task addition keeps them
    under ``average`` (over tasks), transfer at the top."""
    return scores.get("average", scores)


def _score(method: dict) -> tuple[float, float]:
    """(accuracy, NLL) of a method in either metrics layout."""
    scores = layout_scores(method)
    return scores["accuracy"], scores["nll"]


def shot_curves(root: str | Path) -> list[dict]:
    """Rows of data-efficiency curves from run folders laid out ``ROOT/<target>/k<K>/s<seed>``
    (``kall``: every learning image), written by ``vtvc fit --shots K``.

    Per (target, K, method): the mean ± sd over seeds of the test accuracy and NLL (%, nats), and
    the paired difference against VTVC on the same test images: mean over seeds, with each seed's
    95 % interval counted by where it lies (``above``: the method beats VTVC in that seed).

    Raises:
        ConfigError: no finished run under ``root``.
    """
    root = Path(root)
    rows = []
    for target_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for shot_dir in sorted((p for p in target_dir.iterdir() if p.is_dir() and p.name.startswith("k")),
                               key=lambda p: (p.name == "kall", int(p.name[1:]) if p.name[1:].isdigit() else 0)):
            runs = [RunFolder(s).read_metrics() for s in sorted(shot_dir.iterdir()) if RunFolder(s).is_complete()]
            if runs:
                rows += _curve_rows(target_dir.name, shot_dir.name[1:], runs)
    if not rows:
        raise ConfigError(f"no finished run under {root}: lay runs out as ROOT/<target>/k<K>/s<seed> (kall: all images)")
    return rows


def _curve_rows(target: str, shots: str, runs: list[dict]) -> list[dict]:
    rows = []
    for method in CURVE_METHODS:
        have = [m["methods"][method] for m in runs if method in m["methods"]]
        if not have:
            continue
        acc, nll = zip(*(_score(m) for m in have))
        row = {"target": target, "shots": shots, "method": method, "seeds": len(have),
               "accuracy": 100 * _mean(acc), "accuracy_sd": 100 * _sd(acc), "nll": _mean(nll), "nll_sd": _sd(nll)}
        paired = [m["paired_vs_vtvc"] for m in have if "paired_vs_vtvc" in m]
        for key, scale in (("accuracy", 100), ("nll", 1)):
            diffs = [p[key] for p in paired if key in p]
            if diffs:
                row[f"{key}_vs_vtvc"] = scale * _mean([d["difference"] for d in diffs])
                row[f"{key}_vs_vtvc_above"] = sum(d["interval95"][0] > 0 for d in diffs)
                row[f"{key}_vs_vtvc_below"] = sum(d["interval95"][1] < 0 for d in diffs)
        rows.append(row)
    return rows


def _mean(values) -> float:
    values = [v for v in values if v is not None]  # a diverged run's NaN is null in strict JSON
    return statistics.fmean(values) if values else math.nan


def _sd(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def curves_markdown(rows: list[dict]) -> str:
    """The curve rows as a Markdown table: accuracy and NLL per K, and the paired difference against VTVC."""
    lines = ["| target | K | method | seeds | accuracy % | NLL | acc − vtvc, points (seeds above / below 0) | "
             "NLL − vtvc (seeds above / below 0; above: worse than VTVC) |", "|---|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        pair = ("–", "–")
        if "accuracy_vs_vtvc" in r:
            pair = (f"{r['accuracy_vs_vtvc']:+.1f} ({r['accuracy_vs_vtvc_above']}/{r['accuracy_vs_vtvc_below']})",
                    f"{r['nll_vs_vtvc']:+.3f} ({r['nll_vs_vtvc_above']}/{r['nll_vs_vtvc_below']})")
        lines.append(f"| {r['target']} | {r['shots']} | {r['method']} | {r['seeds']} | {r['accuracy']:.1f} ± "
                     f"{r['accuracy_sd']:.1f} | {r['nll']:.3f} ± {r['nll_sd']:.3f} | {pair[0]} | {pair[1]} |")
    return "\n".join(lines)
