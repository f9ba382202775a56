"""One fit, end to end: bank -> target data -> baselines -> VTVC by SVI -> metrics, posterior, files.

Protocol: for a target, the bank's other tasks are composed, never the target's own vector.
Learned methods train on the target's train split, pick their checkpoint on val and report test.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pyro
import torch

from .. import distributed
from ..bank.low_rank import truncate_bank
from ..bank.store import LoadedBank, build_embedded_bank, load_bank
from ..bank.task_vectors import TaskVectorBank
from ..bayes.guide import GUIDES
from ..bayes.priors import make_prior
from ..bayes.registry import make_vtvc
from ..bayes.router import RouterFit, tuned_router
from ..bayes.svi import fit_svi, mean_probs, sample_draws, unpack
from ..compose.engine import Composer
from ..config import DEFAULT_BANK, RUN_RECORD, FitConfig
from ..data.benchmarks import clip_preprocess
from ..data.specs import load_dataset, with_validation
from ..data.suite import TaskData
from ..diagnostics import save_inference_data, site_events, to_inference_data
from ..errors import ConfigError
from ..evaluate import (
    apply_temperature,
    bootstrap_intervals,
    classification_metrics,
    fit_temperature,
    selection_accuracy,
)
from ..io import resolve_device, save_safetensors, write_json
from ..methods import baselines

log = logging.getLogger(__name__)

PACKAGES = ("torch", "pyro-ppl", "open_clip_torch", "arviz", "xarray", "numpy", "safetensors")

WATCH_SETTINGS = ("logger",)
"""Settings that change how a run is watched, not what it computes: ``--resume`` may change them."""


def environment() -> dict:
    """Package versions, Python, platform and the git commit (for reproducibility)."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"packages": versions, "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": commit, "cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}


def device_description(device: torch.device) -> str:
    """``cpu`` or the GPU's name, e.g. ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def read_run_config(run_dir: str | Path) -> tuple[dict, dict]:
    """A run's ``config.json`` as ``(settings, record)``: the :class:`FitConfig` fields, and what the run recorded.

    Raises:
        ConfigError: ``run_dir`` holds no ``config.json``.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no config.json: pass the folder of a finished `vtvc fit` run")
    settings = json.loads(path.read_text())
    if "fit" in settings:  # the layout before 0.2: {"fit": settings (seed under svi), "tasks": ..., ...}
        fit = dict(settings.pop("fit"))
        fit["svi"] = dict(fit.get("svi", {}))
        fit["seed"] = fit["svi"].pop("seed", 0)
        return fit, settings
    return {k: v for k, v in settings.items() if k != RUN_RECORD}, settings.get(RUN_RECORD, {})


def prepare_output(out: Path, cfg_dict: dict, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run folder, or check the one to resume.

    A non-empty folder is refused unless ``overwrite`` (files are then replaced) or ``resume`` (it
    must hold a checkpoint of a run with the same settings).
    """
    if resume:
        saved = out / "config.json"
        if not (out / "checkpoint.safetensors").is_file() or not saved.is_file():
            raise ConfigError(f"--resume: {out} holds no checkpoint of a run; start it without --resume")
        before, _ = read_run_config(out)
        changed = sorted(k for k in set(before) | set(cfg_dict)
                         if k not in WATCH_SETTINGS and before.get(k) != cfg_dict.get(k))
        if changed:
            raise ConfigError(f"--resume: the run in {out} used other settings ({', '.join(changed)}); "
                              "resume with the same options")
        return out
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} exists and is not empty: pass another --out, --resume to continue "
                          "it, or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    return out


def default_out(target: str) -> Path:
    return Path("runs") / f"{target.replace(':', '_').replace('/', '_')}-{datetime.now():%Y%m%d-%H%M%S}"


@dataclass
class Target:
    """A target data set ready for fitting: the bank without the target's own vector, and data on device.

    ``data[split]`` is ``(images [N, 3, H, W], base features [N, D], labels [N])``; in task
    addition (:func:`~vtvc_pyro.protocols.addition.load_addition`) it adds ``classes [N, C]``,
    ``data["task_index"][split]`` holds each image's task and ``own_vector`` the untruncated vectors.
    """

    bank: LoadedBank
    tasks: list[str]
    task: TaskData
    head: torch.Tensor
    data: dict
    own_vector: TaskVectorBank | None
    data_seed: int


def select_target(cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
    """The bank without the target's own vector, the target data set and its head; ``data`` still empty.

    Reads files only (builds the embedded bank when it is missing); no base features are computed.
    """
    if Path(cfg.bank) == Path(DEFAULT_BANK) and not (Path(DEFAULT_BANK) / "manifest.json").is_file():
        build_embedded_bank(DEFAULT_BANK, progress=progress)
    full = load_bank(cfg.bank, dtype=None, stream=True)  # storage dtype (bf16 for imported banks), low peak memory
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
    return Target(bank, tasks, task, head, {}, own_vector, data_seed)


def load_target(cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
    """:func:`select_target` with every split on ``device`` and its base features (cached under the bank)."""
    target = select_target(cfg, device, progress)
    for split in ("train", "val", "test"):
        x, y = target.task.split(split)
        features = target.bank.features(target.task, split, cfg.target, progress=progress)
        target.data[split] = (x.to(device), features.to(device), y.to(device))
    return target


def _without_features(split: tuple) -> tuple:
    """``(images, labels[, classes])`` of an ``(images, features, labels[, classes])`` split."""
    images, _, labels, classes = unpack(split)
    return (images, labels) if classes is None else (images, labels, classes)


def run_router(cfg: FitConfig, target: Target, progress: bool = False) -> tuple[dict, dict, RouterFit]:
    """The deterministic per-sample router (:mod:`vtvc_pyro.bayes.router`) with VTVC's budget and K candidates:
    ``{"val", "test"}`` probabilities, what it chose, and the fit."""
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    fit = tuned_router(composer, target.head, target.data["train"], target.data["val"], cfg.svi,
                       candidate_components(cfg), cfg.hidden, cfg.slab_mean_init, cfg.seed, progress)
    probs = {}
    for split in ("val", "test"):
        images, features, _, classes = unpack(target.data[split])
        probs[split] = mean_probs(fit.model, fit.guide, images, features, classes=classes)
    *history, chosen = fit.history
    info = {**chosen, "best_step": fit.best_step, "best_valnll": fit.best_val_nll, "history": history}
    return probs, info, fit


def run_baselines(cfg: FitConfig, target: Target, names: list[str], progress: bool = False) -> tuple[dict, dict]:
    """``{"val", "test"}`` probabilities of each named baseline that applies, and what each chose.

    Works for task addition too: splits with ``classes`` score every image with its own head.
    """
    test_images, _, _, test_classes = unpack(target.data["test"])
    inputs = baselines.BaselineInputs(
        visual=target.bank.model.visual, vectors=target.bank.vectors, head=target.head,
        train=_without_features(target.data["train"]), val=_without_features(target.data["val"]),
        test_images=test_images, test_classes=test_classes, own_vector=target.own_vector, steps=cfg.svi.steps,
        batch_size=cfg.svi.batch_size, eval_every=cfg.svi.eval_every, seed=cfg.seed, progress=progress,
    )
    probs, info = {}, {}
    for name in names:
        if name == "router":
            p, info[name], _ = run_router(cfg, target, progress)
        else:
            p, info[name] = baselines.run_baseline(name, inputs)
        if p is not None:
            probs[name] = p
    return probs, info


def build_vtvc(cfg: FitConfig, composer: Composer, head: torch.Tensor, feature_dim: int, components: int = 1):
    """The model and guide ``cfg`` names with ``components`` global compositions (seeded: the guide's
    initial weights depend on ``cfg.seed`` alone)."""
    pyro.set_rng_seed(cfg.seed)
    return make_vtvc(cfg.model, cfg.guide, composer, head, make_prior(cfg.prior, **cfg.prior_args), feature_dim,
                     route_a=cfg.route_a, route_b=cfg.route_b, components=components, routing=cfg.routing,
                     hidden=cfg.hidden, tau0=cfg.tau0, beta=cfg.beta,
                     slab_mean_init=cfg.slab_mean_init, gate_logit_init=cfg.gate_logit_init,
                     slab_logvar_init=cfg.slab_logvar_init)


def score_methods(methods: dict[str, dict], val_y: torch.Tensor, test_y: torch.Tensor, seed: int = 0) -> dict:
    """Test metrics of every method with bootstrap 95 % intervals, and the same after temperature
    scaling fitted on val (so "better calibrated" survives the easy fix)."""
    out = {}
    for name, probs in methods.items():
        temperature = fit_temperature(probs["val"], val_y)
        scaled = apply_temperature(probs["test"], temperature)
        out[name] = {**classification_metrics(probs["test"], test_y),
                     "interval95": bootstrap_intervals(probs["test"], test_y, seed=seed),
                     "val": classification_metrics(probs["val"], val_y),
                     "temperature": temperature,
                     "temperature_scaled": classification_metrics(scaled, test_y)}
    return out


def composition_diagnostics(guide, lam: torch.Tensor, gate: torch.Tensor, target: Target) -> dict:
    """Sparsity and selection of the posterior on the test split.

    ``lam``, ``gate``: ``[S, N, T, G]`` posterior draws. Selection accuracy (suite targets, which
    record the transforms behind every image): the image's top-k task vectors by
    Σ_g inclusion × |E λ| are exactly the k source tasks of its transforms.
    """
    inclusion = gate.float().mean(0)  # [N, T, G]
    per_task = inclusion.mean((0, 2))
    out = {"mean_inclusion": float(inclusion.mean()), "inclusion_by_task": dict(zip(target.tasks, per_task.tolist())),
           "inclusion_sd_across_tasks": float(per_task.std()) if len(per_task) > 1 else 0.0}
    if hasattr(guide, "summary"):
        s = guide.summary()
        out["global"] = {"mean_inclusion": float(s["inclusion"].mean()), "kept_fraction": float(s["kept"].mean())}
        if "rho_mean" in s:
            out["global"]["use_rate_by_task"] = dict(zip(target.tasks, s["rho_mean"].tolist()))
    domains = target.task.domains.get("test")
    if domains is not None and target.task.domain_sources:
        index = {t: i for i, t in enumerate(target.tasks)}
        domain_tasks = [[index[t] for t in sources if t in index] for sources in target.task.domain_sources]
        scores = (inclusion * lam.mean(0).abs()).sum(-1)  # [N, T]
        by_domain = [scores[domains == d].mean(0).tolist() if (domains == d).any() else [math.nan] * len(target.tasks)
                     for d in range(len(domain_tasks))]
        out["selection"] = {**selection_accuracy(scores, domains, domain_tasks),
                            "domains": ["+".join(s) for s in target.task.domain_sources],
                            "score_by_domain": by_domain}
    return out


def fit_candidate(cfg: FitConfig, target: Target, composer: Composer, components: int, checkpoint: Path,
                  resume: bool, progress: bool, history: Path | None = None, tensorboard: Path | None = None):
    """One SVI fit with ``components`` compositions; returns ``(model, guide, fit result)``.

    ``history``: its ``history.csv``; ``tensorboard``: its TensorBoard folder (see
    :func:`~vtvc_pyro.bayes.svi.fit_svi`)."""
    data = target.data
    model, guide = build_vtvc(cfg, composer, target.head, data["test"][1].shape[1], components)
    model, guide = model.to(target.head.device), guide.to(target.head.device)
    resume = resume and checkpoint.is_file()  # a candidate the interrupted run had not started starts afresh
    if hasattr(guide, "initialize") and not resume:
        guide.initialize(data["train"][1], seed=cfg.seed)
    fit = fit_svi(model, guide, data["train"], data["val"], cfg.svi, checkpoint_path=checkpoint, resume=resume,
                  progress=progress, seed=cfg.seed, history_path=history, tensorboard_dir=tensorboard)
    return model, guide, fit


def candidate_components(cfg: FitConfig) -> list[int]:
    """The numbers of compositions to fit: ``cfg.components`` for the hierarchical model with an
    amortized guide; ``[1]`` for the flat model and the global guide, which have one."""
    if cfg.model != "hierarchical" or not GUIDES[cfg.guide]["amortized"]:
        return [1]
    return list(cfg.components)


def fit_and_predict(cfg: FitConfig, target: Target, out: Path, resume: bool, progress: bool):
    """Fit VTVC by SVI (every candidate number of components; the lowest val NLL wins) and draw its
    predictive on val and test.

    Returns:
        the fit result, the guide, the composer, ``methods`` (``vtvc``: the Monte Carlo predictive,
        ``vtvc_mean``: the deterministic gated mean, each ``{"val", "test"}``), the test draws
        ``(probs [S, N, C], local, shared)`` of :func:`~vtvc_pyro.bayes.svi.sample_draws` and
        ``{components: val NLL}``.
    """
    data = target.data
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    candidates = {}
    for i, k in enumerate(candidate_components(cfg)):
        # the first candidate's state is the run's checkpoint.safetensors (its steps history.csv,
        # tensorboard/); the others' sit beside them, named after K
        suffix = "" if i == 0 else f"-k{k}"
        tensorboard = None
        if cfg.logger == "tensorboard":
            tensorboard = out / "tensorboard" / ("" if i == 0 else f"k{k}")
        candidates[k] = fit_candidate(cfg, target, composer, k, out / f"checkpoint{suffix}.safetensors", resume,
                                      progress, out / f"history{suffix}.csv", tensorboard)
    chosen = min(candidates, key=lambda k: candidates[k][2].best_val_nll)
    model, guide, fit = candidates[chosen]
    save_safetensors(guide.state_dict(), out / "guide.safetensors",
                     {"best_step": str(fit.best_step), "components": str(chosen)})
    methods, draws = {"vtvc": {}, "vtvc_mean": {}}, None
    for split in ("val", "test"):
        x, f, _, classes = unpack(data[split])
        probs_s, local, shared = sample_draws(model, guide, x, f, cfg.eval_samples, cfg.svi.eval_temperature,
                                              generator_seed=cfg.seed, classes=classes, progress=progress,
                                              desc=f"predictive {split}")
        methods["vtvc"][split] = probs_s.mean(0)
        methods["vtvc_mean"][split] = mean_probs(model, guide, x, f, classes=classes)
        draws = (probs_s, local, shared)
    return fit, guide, composer, methods, draws, {k: c[2].best_val_nll for k, c in candidates.items()}


def posterior_data(cfg: FitConfig, draws: tuple, rows: torch.Tensor, labels: torch.Tensor, tasks: list[str],
                   composer: Composer, class_names, fit, image_task: torch.Tensor | None = None):
    """The InferenceData of ``posterior.nc``: the test draws of :func:`fit_and_predict` for ``rows``
    of the test split (``labels [N_test]``; ``image_task [N_test]`` in task addition)."""
    probs_s, local, shared = draws
    return to_inference_data(
        probs_s[:, rows], {k: v[:, rows] for k, v in local.items()}, shared, labels[rows], tasks,
        composer.group_labels, class_names, fit.elbo_trace, site_events(make_prior(cfg.prior, **cfg.prior_args)),
        image_index=rows, image_task=None if image_task is None else image_task[rows], seed=cfg.seed,
        attrs={"target": cfg.target if cfg.protocol == "transfer" else "addition", "protocol": cfg.protocol,
               "model": cfg.model, "prior": cfg.prior, "guide": cfg.guide, "granularity": cfg.granularity},
    )


def run_fit(cfg: FitConfig, out: Path, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Fit VTVC and the baselines on ``cfg.target``; write config, metrics, guide and posterior to ``out``.

    Returns:
        the metrics dict (also in ``out/metrics.json``) plus ``timing`` (``out/timing.json``).
        With ``cfg.protocol == "addition"`` this is :func:`~vtvc_pyro.protocols.addition.run_addition`.
    """
    cfg.validate()
    if cfg.protocol == "addition":
        from .addition import run_addition  # addition builds on this module's pieces

        return run_addition(cfg, out, overwrite, resume, progress)
    out, overwrite = distributed.setup_run(Path(out), overwrite, resume)  # torchrun: only rank 0 writes to out
    device = resolve_device(cfg.device)
    prior = make_prior(cfg.prior, **cfg.prior_args)
    start = time.time()
    target = load_target(cfg, device, progress)
    bank, data, task, tasks = target.bank, target.data, target.task, target.tasks

    fit_settings = json.loads(json.dumps(asdict(cfg)))  # JSON-normalised
    out = prepare_output(Path(out), fit_settings, overwrite, resume)  # after every input is known to be usable
    if not resume:
        # the settings at the top level (``vtvc fit --config config.json`` replays them); what the run
        # found and where it ran under "run", which a replay ignores
        write_json(out / "config.json", {**fit_settings, RUN_RECORD: {
            "argv": sys.argv,
            "prior_settings": prior.settings(),
            "tasks": tasks,
            "bank_fingerprint": bank.manifest["base_fingerprint"],
            "data_seed": target.data_seed,
            "device": device_description(device),
            "environment": environment(),
        }})

    val_y, test_y = data["val"][2], data["test"][2]
    methods, extra = run_baselines(cfg, target, baselines.expand_names(cfg.baselines), progress)
    svi_start = time.time()
    fit, guide, composer, vtvc_methods, draws, val_nll_by_k = fit_and_predict(cfg, target, out, resume, progress)
    probs_s, local, _ = draws
    lam_s, gate_s = local["lam"], local["inclusion"]
    methods.update(vtvc_methods)
    vtvc_seconds = time.time() - svi_start

    metrics = {
        "target": cfg.target,
        "methods": score_methods(methods, val_y, test_y, seed=cfg.seed),
        "num_test": len(test_y),
        "tasks": tasks,
        "svi": {"components": min(val_nll_by_k, key=val_nll_by_k.get), "val_nll_by_components": val_nll_by_k,
                "best_step": fit.best_step, "best_val_nll": fit.best_val_nll,
                "best_val_accuracy": fit.best_val_accuracy,
                "final_elbo": next((e for e in reversed(fit.elbo_trace) if math.isfinite(e)), None),
                "val_history": fit.val_history},
        "composition": composition_diagnostics(guide, lam_s, gate_s, target),
        "baselines": extra,
    }
    write_json(out / "metrics.json", metrics)  # no timings here: same seed and device, same file
    timing = {"svi_seconds": round(fit.seconds, 2), "svi_samples_per_second": round(fit.samples_per_second, 1),
              "vtvc_seconds": round(vtvc_seconds, 2), "total_seconds": round(time.time() - start, 2)}
    write_json(out / "timing.json", timing)
    metrics["timing"] = timing
    save_safetensors({**{name: p["test"].float() for name, p in methods.items()}, "labels": test_y},
                     out / "predictions.safetensors")

    rows = torch.arange(min(cfg.posterior_samples, len(test_y)), device=test_y.device)
    idata = posterior_data(cfg, draws, rows, test_y, tasks, composer, task.class_names, fit)
    save_inference_data(idata, out / "posterior.nc")
    return metrics


def plan_fit(cfg: FitConfig) -> dict:
    """What ``run_fit(cfg)`` would use, resolved without writing anything (``vtvc fit --dry_run``).

    Returns:
        ``{"device", "bank", "target", "splits", "tasks", "coefficients", "composition", "baselines", ...}``;
        where the embedded bank is not built yet, the parts that need it say so.
    """
    cfg.validate()
    make_prior(cfg.prior, **cfg.prior_args)  # unknown names and bad arguments fail here, as in a run
    device = resolve_device(cfg.device)
    plan = {"device": device_description(device), "bank": str(cfg.bank), "target": cfg.target,
            "model": cfg.model, "prior": cfg.prior, "guide": cfg.guide, "baselines": baselines.expand_names(cfg.baselines),
            "svi": f"{cfg.svi.steps} steps of batch {cfg.svi.batch_size}, seed {cfg.seed}"}
    if cfg.protocol == "addition" and (Path(cfg.bank) / "manifest.json").is_file():
        from .addition import select_addition  # addition builds on this module's pieces

        bank, datasets, heads, _, _, _ = select_addition(cfg, torch.device("cpu"))
        composer = Composer(bank.model.visual, bank.vectors, cfg.granularity)
        plan.update({"protocol": "addition", "target": "addition (every task's test split, its own head)",
                     "arch": bank.arch, "tasks": heads.names,
                     "splits": {t.name: {split: len(t.split(split)[1]) for split in ("train", "val", "test")}
                                for t in datasets},
                     "classes": heads.offsets[-1], "fit_split": cfg.fit_split,
                     "coefficients": f"{composer.num_tasks} tasks x {composer.num_groups} {cfg.granularity} groups per image"})
        return plan
    if not (Path(cfg.bank) / "manifest.json").is_file():
        if Path(cfg.bank) != Path(DEFAULT_BANK):
            raise ConfigError(f"{cfg.bank} holds no bank (manifest.json): build or import one, or pass --bank")
        plan["bank"] += " (not built yet: the fit builds it first, about 3 minutes on 2 cores)"
        task = with_validation(load_dataset(cfg.target, 0), 0)
        plan["splits"] = {split: len(task.split(split)[1]) for split in ("train", "val", "test")}
        return plan
    target = select_target(cfg, torch.device("cpu"))  # no features: they would cost forward passes and a cache write
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    plan.update({
        "arch": target.bank.arch,
        "splits": {split: len(target.task.split(split)[1]) for split in ("train", "val", "test")},
        "classes": len(target.task.class_names),
        "tasks": target.tasks,
        "coefficients": f"{composer.num_tasks} tasks x {composer.num_groups} {cfg.granularity} groups per image",
        "composition": dict(Counter(composer.plan().values())),
        "own_vector_held_out": target.own_vector is not None,
    })
    return plan


def format_table(metrics: dict) -> str:
    """A plain-text results table (of either protocol)."""
    if metrics.get("protocol") == "addition":
        from .addition import format_addition

        return format_addition(metrics)
    rows = [f"target: {metrics['target']}  ({metrics['num_test']} test images, {len(metrics['tasks'])} task vectors)",
            f"{'method':18s} {'accuracy':>9s} {'95% interval':>15s} {'nll':>8s} {'ece':>8s} {'brier':>8s} "
            f"{'nll (TS)':>9s} {'ece (TS)':>9s}"]
    for name, m in metrics["methods"].items():
        lo, hi = m.get("interval95", {}).get("accuracy", (math.nan, math.nan))
        ts = m.get("temperature_scaled", {})
        rows.append(f"{name:18s} {m['accuracy']:9.4f} {f'[{lo:.3f}, {hi:.3f}]':>15s} {m['nll']:8.4f} {m['ece']:8.4f} "
                    f"{m['brier']:8.4f} {ts.get('nll', math.nan):9.4f} {ts.get('ece', math.nan):9.4f}")
    comp = metrics.get("composition", {})
    if comp:
        line = f"posterior inclusion {comp['mean_inclusion']:.3f} (sd across tasks {comp['inclusion_sd_across_tasks']:.3f})"
        if "selection" in comp:
            line += f"; selection accuracy {comp['selection']['overall']:.3f}"
        rows.append(line)
    return "\n".join(rows)
