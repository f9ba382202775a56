"""Task addition: one composed model for every task of the bank, scored on each task's test split.

Protocol (task_vectors, aTLAS, AdaMerging, TIES, WEMoE):

* every task's vector is composed (T tasks, T vectors);
* the learned methods learn from the union of the tasks' ``train`` splits and select on the union
  of their ``val`` splits (``--fit_split val``: aTLAS's real-scale protocol, learning from 90 % of
  each task's val split and selecting on the rest, so the fine-tuning data is never seen);
* every image carries its task, and the likelihood scores it with that task's frozen zero-shot head
  (the heads are stacked, the other tasks' classes masked: :mod:`vtvc_pyro.compose.heads`). The
  posterior (and the router) sees only the image: recognising the task is part of the job;
* reported per task on its test split (accuracy, NLL, ECE, Brier), their average, and the
  normalized average: accuracy ÷ the task's own fine-tuned accuracy (its vector at λ = 1).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import distributed
from ..bank.low_rank import truncate_bank
from ..bank.store import LoadedBank, build_embedded_bank, load_bank
from ..bayes.priors import make_prior
from ..compose.engine import Composer
from ..compose.heads import TaskHeads
from ..config import DEFAULT_BANK, RUN_RECORD, FitConfig
from ..data.benchmarks import clip_preprocess, concat_images
from ..data.specs import load_dataset, with_validation
from ..data.suite import TaskData
from ..diagnostics import save_inference_data
from ..errors import ConfigError
from ..evaluate import classification_metrics
from ..io import resolve_device, save_safetensors, write_json
from ..methods import baselines
from ..methods.merges import predict_shared
from .transfer import (
    Target,
    composition_diagnostics,
    device_description,
    environment,
    fit_and_predict,
    posterior_data,
    prepare_output,
    run_baselines,
    run_router,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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


def select_addition(cfg: FitConfig, device: torch.device, progress: bool = False):
    """The bank with every task's vector (in ``cfg.tasks`` order), the tasks' data sets and heads,
    and their specs: ``(bank, datasets, heads, specs, data_seed, own)`` (``own``: the untruncated
    vectors when ``cfg.low_rank`` truncates the bank, else ``None``). Reads files only (builds the
    embedded bank when it is missing); no base features are computed."""
    if Path(cfg.bank) == Path(DEFAULT_BANK) and not (Path(DEFAULT_BANK) / "manifest.json").is_file():
        build_embedded_bank(DEFAULT_BANK, progress=progress)
    full = load_bank(cfg.bank, dtype=None, stream=True)
    data_seed = full.manifest.get("config", {}).get("seed", 0)
    specs = addition_specs(cfg, full.vectors.tasks)
    tasks, vectors = [], []
    for spec in specs:
        task = learning_splits(load_dataset(spec, data_seed, preprocess=clip_preprocess(full.model)), cfg.fit_split,
                               data_seed)
        tasks.append(task)
        vectors.append(vector_for(spec, task, full.vectors.tasks))
    if len(set(vectors)) < len(vectors):
        raise ConfigError(f"two data sets map to the same task vector ({', '.join(vectors)}): list each task once")
    own = full.vectors.select(vectors)
    bank_vectors = truncate_bank(own, rank=cfg.low_rank) if cfg.low_rank else own
    bank = LoadedBank(full.path, full.manifest, full.model.to(device), bank_vectors.to(device), full.heads)
    heads = TaskHeads(vectors, [bank.head_for(t).to(device) for t in tasks])
    # each task's own fine-tuned vector, never truncated: the reference of the normalized average
    return bank, tasks, heads, specs, data_seed, (own.to(device) if cfg.low_rank else None)


def load_addition(cfg: FitConfig, device: torch.device, progress: bool = False) -> tuple[Target, list[TaskData], TaskHeads]:
    """Every task's data, head and vector as one :class:`~vtvc_pyro.protocols.transfer.Target`.

    ``target.data[split]`` is ``(images [N, 3, H, W], features [N, D], labels [N] (columns of the
    stacked heads), classes [N, C] bool)`` over the union of the tasks in order;
    ``target.data["task_index"][split]`` holds each image's task ``[N]``.
    """
    bank, tasks, heads, specs, data_seed, own = select_addition(cfg, device, progress)
    vectors = heads.names
    # with --fit_split val the train/val splits are other subsets: cached under their own names
    cache = [spec if cfg.fit_split == "train" else f"{spec}+fit_split_val" for spec in specs]
    data, task_index = {}, {}
    for split in SPLITS:
        parts = [t.split(split) for t in tasks]
        index = torch.cat([torch.full((len(y),), i, dtype=torch.long) for i, (_, y) in enumerate(parts)]).to(device)
        labels = heads.global_labels(index, torch.cat([y for _, y in parts]).to(device))
        features = torch.cat([bank.features(t, split, key, progress=progress)
                              for t, key in zip(tasks, cache)]).to(device)
        images = concat_images([x.to(device) for x, _ in parts])
        data[split] = (images, features, labels, heads.classes_for(index))
        task_index[split] = index
    data["task_index"] = task_index
    class_names = tuple(f"{name}/{c}" for name, t in zip(vectors, tasks) for c in t.class_names)
    union = TaskData("addition", class_names, ())
    return Target(bank, vectors, union, heads.weight, data, own, data_seed), tasks, heads


# ---------------------------------------------------------------- methods
@torch.no_grad()
def finetuned_probs(target: Target, heads: TaskHeads, granularity: str = "task") -> dict[str, torch.Tensor]:
    """Each task's own fine-tuned model (its vector at λ = 1, untruncated: ``target.own_vector`` holds
    the full vectors when the bank is composed at low rank) on its own images: the upper reference."""
    vectors = target.own_vector if target.own_vector is not None else target.bank.vectors
    out = {}
    for split in ("val", "test"):
        images, _, _, classes = target.data[split]
        index = target.data["task_index"][split]
        probs = torch.zeros(len(index), heads.weight.shape[0], device=heads.weight.device)
        for t, name in enumerate(target.tasks):
            rows = (index == t).nonzero().squeeze(1)
            composer = Composer(target.bank.model.visual, vectors.select([name]), granularity)
            probs[rows] = predict_shared(composer, heads.weight, images[rows], torch.ones(1, 1, device=probs.device),
                                         classes=classes[rows])
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


def score_addition(methods: dict[str, dict], target: Target, heads: TaskHeads, reference: str = "finetuned") -> dict:
    """Per task, average and normalized average (accuracy ÷ ``reference``'s accuracy on that task) of every method.

    Returns:
        ``{method: {"per_task": {task: metrics}, "average": metrics averaged over tasks,
        "normalized_average": float | None, "normalized": {task: float}, "val": {"average": ...}}}``.
    """
    scores = {}
    for name, probs in methods.items():
        block = {}
        for split in ("test", "val"):
            per_task = per_task_metrics(probs[split], target.data[split][2], target.data["task_index"][split], heads)
            average = {k: sum(m[k] for m in per_task.values()) / len(per_task) for k in next(iter(per_task.values()))}
            block[split] = {"per_task": per_task, "average": average}
        scores[name] = {"per_task": block["test"]["per_task"], "average": block["test"]["average"],
                        "val": block["val"]["average"]}
    if reference in scores:
        ref = {t: m["accuracy"] for t, m in scores[reference]["per_task"].items()}
        for entry in scores.values():
            normalized = {t: m["accuracy"] / ref[t] if ref[t] > 0 else math.nan for t, m in entry["per_task"].items()}
            entry["normalized"] = normalized
            entry["normalized_average"] = sum(normalized.values()) / len(normalized)
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


def stratified_rows(index: torch.Tensor, total: int) -> torch.Tensor:
    """Up to ``total`` test rows, as many from every task (the first of each), in data set order."""
    tasks = int(index.max()) + 1
    per = total // tasks
    rows = [(index == t).nonzero().squeeze(1)[:per] for t in range(tasks)]
    rows = torch.cat(rows)
    return rows if len(rows) or total <= 0 else (index >= 0).nonzero().squeeze(1)[:total]  # fewer than one per task


# ---------------------------------------------------------------- the run
def run_addition(cfg: FitConfig, out: Path, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Task addition with VTVC and the baselines; writes config, metrics, guide and posterior to ``out``.

    Returns:
        the metrics dict (also in ``out/metrics.json``) plus ``timing``.
    """
    cfg.validate()
    out, overwrite = distributed.setup_run(Path(out), overwrite, resume)
    device = resolve_device(cfg.device)
    start = time.time()
    target, datasets, heads = load_addition(cfg, device, progress)
    fit_settings = json.loads(json.dumps(asdict(cfg)))
    out = prepare_output(Path(out), fit_settings, overwrite, resume)
    if not resume:
        write_json(out / "config.json", {**fit_settings, RUN_RECORD: {
            "argv": sys.argv, "prior_settings": make_prior(cfg.prior, **cfg.prior_args).settings(),
            "tasks": target.tasks, "datasets": [t.name for t in datasets],
            "bank_fingerprint": target.bank.manifest["base_fingerprint"], "data_seed": target.data_seed,
            "device": device_description(device), "environment": environment(),
        }})
    names = baselines.expand_names(cfg.baselines)
    # each task's own fine-tuned model normalizes the average: always computed
    methods = {"finetuned": finetuned_probs(target, heads)}
    shared, extra = run_baselines(cfg, target, [n for n in names if n not in ("finetuned", "router")], progress)
    methods.update(shared)
    index = target.data["task_index"]["test"]
    routing = {}
    if "router" in names:
        methods["router"], extra["router"], router = run_router(cfg, target, progress)
        with torch.no_grad():
            lam = router.guide.mean_coefficients(target.data["test"][1])[None]  # [1, N, T, G]
        routing["router"] = routing_diagnostics(lam, torch.ones_like(lam), index, target.tasks)
    svi_start = time.time()
    fit, guide, composer, vtvc_methods, draws, val_nll_by_k = fit_and_predict(cfg, target, out, resume, progress)
    methods.update(vtvc_methods)
    local = draws[1]
    lam_s, gate_s = local["lam"], local["inclusion"]
    routing["vtvc"] = routing_diagnostics(lam_s, gate_s, index, target.tasks)
    metrics = {
        "protocol": "addition",
        "target": "addition",
        "tasks": target.tasks,
        "datasets": [t.name for t in datasets],
        "num_test": {name: int((index == t).sum()) for t, name in enumerate(target.tasks)},
        "methods": score_addition(methods, target, heads),
        "routing": routing,
        "svi": {"components": min(val_nll_by_k, key=val_nll_by_k.get), "val_nll_by_components": val_nll_by_k,
                "best_step": fit.best_step, "best_val_nll": fit.best_val_nll, "val_history": fit.val_history},
        "composition": composition_diagnostics(guide, lam_s, gate_s, target),
        "baselines": extra,
    }
    write_json(out / "metrics.json", metrics)
    timing = {"svi_seconds": round(fit.seconds, 2), "svi_samples_per_second": round(fit.samples_per_second, 1),
              "vtvc_seconds": round(time.time() - svi_start, 2),
              "total_seconds": round(time.time() - start, 2)}
    write_json(out / "timing.json", timing)
    metrics["timing"] = timing
    test_labels = target.data["test"][2]
    save_safetensors({**{name: p["test"].float() for name, p in methods.items()}, "labels": test_labels,
                      "task_index": index}, out / "predictions.safetensors")
    rows = stratified_rows(index, cfg.posterior_samples)
    idata = posterior_data(cfg, draws, rows, test_labels, target.tasks, composer, target.task.class_names, fit,
                           image_task=index)
    save_inference_data(idata, out / "posterior.nc")
    return metrics



def format_addition(metrics: dict) -> str:
    """A plain-text table: methods x (average accuracy, normalized average, NLL, ECE, routing accuracy)."""
    sizes = metrics["num_test"]
    rows = [f"task addition: {len(metrics['tasks'])} tasks, {sum(sizes.values())} test images",
            f"{'method':18s} {'avg acc':>8s} {'norm avg':>9s} {'nll':>8s} {'ece':>8s} {'routing':>8s}"]
    for name, m in metrics["methods"].items():
        routing = metrics.get("routing", {}).get(name, metrics.get("routing", {}).get(name.removesuffix("_mean"), {}))
        norm = m.get("normalized_average")
        rows.append(f"{name:18s} {m['average']['accuracy']:8.4f} {norm if norm is not None else math.nan:9.4f} "
                    f"{m['average']['nll']:8.4f} {m['average']['ece']:8.4f} "
                    f"{routing.get('routing_accuracy', math.nan):8.4f}")
    return "\n".join(rows)
