"""Task addition: one composed model for every task of the bank, scored on each task's test split.

Protocol (task_vectors, aTLAS, AdaMerging, TIES, WEMoE):

* every task's vector is composed (T tasks, T vectors);
* the learned methods learn from 90 % of each task's held-out ``val`` split and select on the rest
  (``--fit_split val``, the default: aTLAS's protocol, so the images the task vectors were
  fine-tuned on are never seen), or learn from the ``train`` splits, the vectors' own fine-tuning
  images, and select on ``val`` (``--fit_split train``);
* every image carries its task, and the likelihood scores it with that task's frozen zero-shot head
  (the heads are stacked, the other tasks' classes masked: :mod:`vtvc_pyro.compose.heads`). The
  posterior (and the router) sees only the image: recognising the task is part of the job;
* reported per task on its test split (accuracy, NLL, ECE, Brier), their average, and the
  normalized average: accuracy ÷ the task's own fine-tuned accuracy (its vector at λ = 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..bank.low_rank import truncate_bank
from ..bank.store import LoadedBank
from ..compose.engine import Composer
from ..compose.heads import TaskHeads
from ..config import FitConfig
from ..data.benchmarks import clip_preprocess, concat_images
from ..data.specs import load_dataset, with_validation
from ..data.split import Split
from ..data.suite import TaskData
from ..errors import ConfigError
from ..evaluate import classification_metrics
from ..methods import baselines
from ..methods.merges import predict_shared
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
    run_router,
)

# ---------------------------------------------------------------- data
def vector_for(spec: str, task: TaskData, names: list[str]) -> str:
    """The bank's vector of a data set: the one named like the spec or the data set (``suite:``,
    ``@ROOT`` and a ``Val`` suffix ignored)."""
    rest = spec.partition(":")[2] if ":" in spec else spec
    candidates = [spec, rest, rest.partition("@")[0], task.name, task.name.removesuffix("Val")]
    for name in candidates:
        if name in names:
            return name
    raise ConfigError(f"the bank has no task vector for {spec!r} (data set {task.name!r}); it has "
                      f"{', '.join(names)}: name the data sets like the bank's vectors")


def learning_splits(task: TaskData, fit_split: str, seed: int) -> TaskData:
    """The task with ``train``/``val``/``test``: as given (``train``), or learned from val (``val``:
    90 % of it becomes ``train``, the rest ``val``; the fine-tuning train split is dropped).

    Raises:
        ConfigError: ``fit_split="val"`` for a data set without a val split of its own (one carved
            from train would be fine-tuning data, which ``val`` promises never to use).
    """
    if fit_split == "val" and "val" not in task.splits:
        raise ConfigError(f"--fit_split val needs data sets with their own val split, and {task.name} has none "
                          "(its val would be carved from the fine-tuning data): use --fit_split train")
    task = with_validation(task, seed)
    if fit_split == "train":
        return task
    held = TaskData(task.name, task.class_names, task.templates, {"train": task.split("val"), "test": task.split("test")})
    return with_validation(held, seed)


def addition_specs(cfg: FitConfig, bank_tasks: list[str]) -> list[str]:
    """The data set specs of the tasks: ``cfg.tasks``, or every vector of the bank as a suite task."""
    if cfg.tasks:
        return list(cfg.tasks)
    return list(bank_tasks)


def select_addition(cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
    """The bank with every task's vector (in ``cfg.tasks`` order), the tasks' data sets and stacked
    heads; ``data`` still empty. ``own_vector``: the untruncated vectors when ``cfg.low_rank``
    truncates the bank, else ``None``. Reads files only (builds the embedded bank when it is
    missing); no base features are computed."""
    full = open_bank(cfg, progress)
    data_seed = full.manifest.get("config", {}).get("seed", 0)
    datasets, vectors = [], []
    for spec in addition_specs(cfg, full.vectors.tasks):
        task = learning_splits(load_dataset(spec, data_seed, preprocess=clip_preprocess(full.model)), cfg.fit_split,
                               data_seed)
        datasets.append(task)
        vectors.append(vector_for(spec, task, full.vectors.tasks))
    if len(set(vectors)) < len(vectors):
        raise ConfigError(f"two data sets map to the same task vector ({', '.join(vectors)}): list each task once")
    own = full.vectors.select(vectors)
    bank_vectors = truncate_bank(own, rank=cfg.low_rank) if cfg.low_rank else own
    bank = LoadedBank(full.path, full.manifest, full.model.to(device), bank_vectors.to(device), full.heads)
    heads = TaskHeads(vectors, [bank.head_for(t).to(device) for t in datasets])
    class_names = tuple(f"{name}/{c}" for name, t in zip(vectors, datasets) for c in t.class_names)
    # each task's own fine-tuned vector, never truncated: the reference of the normalized average
    return Target("addition", bank, vectors, TaskData("addition", class_names, ()), heads.weight,
                  own_vector=own.to(device) if cfg.low_rank else None, data_seed=data_seed, task_index={},
                  heads=heads, datasets=datasets)


def load_addition(cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
    """:func:`select_addition` with every split of every task, as one union on ``device``.

    ``target.data[split]`` has labels in the columns of the stacked heads and ``classes [N, C]``
    (each image's own head); ``target.task_index[split]`` holds each image's task ``[N]``.
    """
    target = select_addition(cfg, device, progress)
    heads, specs = target.heads, addition_specs(cfg, target.tasks)
    # with --fit_split val the train/val splits are other subsets: cached under their own names
    cache = [spec if cfg.fit_split == "train" else f"{spec}+fit_split_val" for spec in specs]
    for split in SPLITS:
        parts = [t.split(split) for t in target.datasets]
        index = torch.cat([torch.full((len(y),), i, dtype=torch.long) for i, (_, y) in enumerate(parts)]).to(device)
        labels = heads.global_labels(index, torch.cat([y for _, y in parts]).to(device))
        features = torch.cat([target.bank.features(t, split, key, progress=progress)
                              for t, key in zip(target.datasets, cache)]).to(device)
        images = concat_images([x.to(device) for x, _ in parts])
        target.data[split] = Split(images, features, labels, heads.classes_for(index))
        target.task_index[split] = index
    return target


# ---------------------------------------------------------------- methods
@torch.no_grad()
def finetuned_probs(target: Target, granularity: str = "task") -> dict[str, torch.Tensor]:
    """Each task's own fine-tuned model (its vector at λ = 1, untruncated: ``target.own_vector`` holds
    the full vectors when the bank is composed at low rank) on its own images: the upper reference."""
    vectors = target.own_vector if target.own_vector is not None else target.bank.vectors
    out = {}
    for split in ("val", "test"):
        data, index = target.data[split], target.task_index[split]
        probs = torch.zeros(len(index), target.head.shape[0], device=target.head.device)
        for t, name in enumerate(target.tasks):
            rows = (index == t).nonzero().squeeze(1)
            composer = Composer(target.bank.model.visual, vectors.select([name]), granularity)
            probs[rows] = predict_shared(composer, target.head, data.images[rows],
                                         torch.ones(1, 1, device=probs.device), classes=data.classes[rows])
        out[split] = probs
    return out


# ---------------------------------------------------------------- scores
def per_task_metrics(probs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, heads: TaskHeads) -> dict:
    """``probs [N, C]`` over the stacked heads -> ``{task: metrics}`` on each task's own classes."""
    out = {}
    for t, name in enumerate(heads.names):
        rows = index == t
        cols = heads.columns(t)
        own = probs[rows][:, cols]
        own = own / own.sum(-1, keepdim=True).clamp_min(1e-30)  # exact already; guards rounding
        out[name] = classification_metrics(own, labels[rows] - cols.start)
    return out


def average_over_tasks(per_task: dict[str, dict]) -> dict:
    """The mean over tasks of every metric of ``per_task`` (``{task: metrics}``)."""
    return {k: sum(m[k] for m in per_task.values()) / len(per_task) for k in next(iter(per_task.values()))}


def score_addition(methods: dict[str, dict], target: Target, reference: str = "finetuned", seed: int = 0) -> dict:
    """Per task, average and normalized average (accuracy ÷ ``reference``'s accuracy on that task) of every method.

    Returns:
        ``{method: {"per_task": {task: metrics}, "average": metrics averaged over tasks,
        "normalized_average": float | None, "normalized": {task: float}, "val": {"average": ...},
        "paired_vs_vtvc": the paired difference of the task-averaged accuracy and NLL against VTVC}}``.
    """
    scores = {}
    for name, probs in methods.items():
        per_task = {split: per_task_metrics(probs[split], target.data[split].labels, target.task_index[split],
                                            target.heads) for split in ("test", "val")}
        scores[name] = {"per_task": per_task["test"], "average": average_over_tasks(per_task["test"]),
                        "val": average_over_tasks(per_task["val"])}
    if reference in scores:
        ref = {t: m["accuracy"] for t, m in scores[reference]["per_task"].items()}
        for entry in scores.values():
            normalized = {t: m["accuracy"] / ref[t] if ref[t] > 0 else math.nan for t, m in entry["per_task"].items()}
            entry["normalized"] = normalized
            entry["normalized_average"] = sum(normalized.values()) / len(normalized)
    test = target.data["test"]
    for name, paired in paired_against(methods, test.labels, groups=target.task_index["test"], seed=seed).items():
        scores[name]["paired_vs_vtvc"] = paired
    return scores


def routing_matrix(weights: torch.Tensor, index: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Mean of ``weights [N, T]`` over the images of each task: ``[task of the image, task vector]``."""
    rows = [weights[index == t].mean(0) if (index == t).any() else weights.new_full((weights.shape[1],), math.nan)
            for t in range(num_tasks)]
    return torch.stack(rows)


def routing_diagnostics(lam: torch.Tensor, inclusion: torch.Tensor, index: torch.Tensor, tasks: list[str]) -> dict:
    """How each image's composition routes: E λ and inclusion averaged by (image's task × task vector),
    and routing accuracy (the image's largest-weight vector, Σ_g inclusion · |E λ|, is its own task's).

    Args:
        lam, inclusion: ``[S, N, T, G]`` posterior draws (a deterministic method: ``S = 1``, inclusion 1).
        index: ``[N]`` each image's task.
    """
    mean_lam, incl = lam.mean(0), inclusion.float().mean(0)  # [N, T, G]
    weight = (incl * mean_lam.abs()).sum(-1)  # [N, T]
    hit = weight.argmax(-1) == index
    per_task = {name: float(hit[index == t].float().mean()) for t, name in enumerate(tasks) if (index == t).any()}
    return {"tasks": list(tasks),
            "mean_lambda": routing_matrix(mean_lam.mean(-1), index, len(tasks)).tolist(),
            "inclusion": routing_matrix(incl.mean(-1), index, len(tasks)).tolist(),
            "weight": routing_matrix(weight, index, len(tasks)).tolist(),
            "routing_accuracy": float(sum(per_task.values()) / len(per_task)),
            "routing_accuracy_by_task": per_task}


def format_addition(metrics: dict) -> str:
    """A plain-text table: methods x (average accuracy, normalized average, NLL, ECE, routing accuracy, and the
    paired difference of the average accuracy against VTVC with its 95 % interval)."""
    sizes = metrics["num_test"]
    rows = [f"task addition: {len(metrics['tasks'])} tasks, {sum(sizes.values())} test images",
            f"{'method':18s} {'avg acc %':>9s} {'norm %':>7s} {'NLL':>7s} {'ECE %':>6s} {'routing %':>9s} "
            f"{'avg acc - vtvc, points, paired 95%':>35s}"]
    own = metrics.get("routing", {})
    for name, m in metrics["methods"].items():
        routing = own.get(name, own.get("vtvc", {}) if name.startswith("vtvc") else {})  # one posterior, both predictions
        rows.append(f"{name:18s} {percent(m['average']['accuracy']):9.1f} {percent(m.get('normalized_average')):7.1f} "
                    f"{m['average']['nll']:7.3f} {percent(m['average']['ece']):6.1f} "
                    f"{percent(routing.get('routing_accuracy')):9.1f} {paired_cell(m):>35s}")
    return "\n".join(rows)


class Addition(FitProtocol):
    """Task addition (see the module docstring)."""

    name = "addition"
    shot_unit = "task"

    def label(self, cfg: FitConfig) -> str:
        return "addition"

    def select(self, cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
        return select_addition(cfg, device, progress)

    def load(self, cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
        return apply_shots(load_addition(cfg, device, progress), cfg.shots, cfg.seed)

    def record(self, target: Target) -> dict:
        return {"datasets": [t.name for t in target.datasets]}

    def run_baselines(self, cfg: FitConfig, target: Target, progress: bool) -> BaselineRun:
        """Each task's own fine-tuned model first (it normalizes the average: always computed), then the
        shared baselines, then the router with its routing diagnostics."""
        names = baselines.expand_names(cfg.baselines, cfg.model)
        methods = {"finetuned": finetuned_probs(target)}
        shared, extra = run_baselines(cfg, target, [n for n in names if n not in ("finetuned", "router")], progress)
        methods.update(shared)
        routing = {}
        if "router" in names:
            methods["router"], extra["router"], router = run_router(cfg, target, progress)
            with torch.no_grad():
                lam = router.guide.mean_coefficients(target.data["test"].features)[None]  # [1, N, T, G]
            routing["router"] = routing_diagnostics(lam, torch.ones_like(lam), target.task_index["test"], target.tasks)
        return BaselineRun(methods, extra, routing)

    def metrics(self, cfg: FitConfig, target: Target, methods: dict, baselines: BaselineRun, vtvc: VTVCFit) -> dict:
        index, local = target.task_index["test"], vtvc.draws.local
        routing = {**baselines.routing, "vtvc": routing_diagnostics(local["lam"], local["inclusion"], index, target.tasks)}
        return {"protocol": "addition", "target": "addition", "tasks": target.tasks,
                "datasets": [t.name for t in target.datasets],
                "num_test": {name: int((index == t).sum()) for t, name in enumerate(target.tasks)},
                "methods": score_addition(methods, target, seed=cfg.seed), "routing": routing,
                "svi": vtvc.svi_summary(detailed=False),
                "composition": composition_diagnostics(vtvc.guide, local["lam"], local["inclusion"], target),
                "baselines": baselines.info}

    def score_test(self, target: Target, probs: torch.Tensor) -> dict:
        test = target.data["test"]
        per_task = per_task_metrics(probs, test.labels, target.task_index["test"], target.heads)
        return {**average_over_tasks(per_task), "per_task": per_task,
                "where": f"the test splits of its {len(per_task)} tasks (average over tasks, {len(test)} images)"}

    def describe(self, target: Target, split: str) -> str:
        return f"the {split} splits of {', '.join(t.name for t in target.datasets)}"

    def prediction_head(self, target: Target, task: str | None) -> tuple[torch.Tensor, list[str]]:
        if task not in target.heads.names:
            raise ConfigError(f"this is a task-addition run: pass task= one of {', '.join(target.heads.names)} "
                              "(the head whose classes to predict)")
        t = target.heads.names.index(task)
        return target.heads.heads[t], list(target.datasets[t].class_names)

    def plan(self, cfg: FitConfig) -> dict:
        if not (Path(cfg.bank) / "manifest.json").is_file():
            return {"tasks": list(cfg.tasks) or "every vector of the bank"}
        target = select_addition(cfg, torch.device("cpu"))
        composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
        return {"target": "addition (every task's test split, its own head)", "arch": target.bank.arch,
                "tasks": target.tasks,
                "splits": {t.name: {split: len(t.split(split)[1]) for split in SPLITS} for t in target.datasets},
                "classes": target.heads.offsets[-1], "fit_split": cfg.fit_split,
                "coefficients": f"{composer.num_tasks} tasks x {composer.num_groups} {cfg.granularity} groups per image"}

    def format(self, metrics: dict) -> str:
        return format_addition(metrics)
