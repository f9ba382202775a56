"""The fitting kit every protocol shares: its data, the protocol interface, VTVC's fit and predictive,
the baselines, scores and diagnostics, and the posterior's InferenceData.

A protocol (:mod:`.transfer`, :mod:`.addition`) turns settings into a :class:`Target` and the
methods' probabilities into metrics; everything else here is the same for all of them, and
:func:`~vtvc_pyro.protocols.fit.run_fit` runs the shared skeleton.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyro
import torch

from ..bank.store import LoadedBank, build_embedded_bank, load_bank
from ..bank.task_vectors import TaskVectorBank
from ..bayes.guide import GUIDES, GuideSettings
from ..bayes.predictive import mean_probs, sample_draws
from ..bayes.priors import make_prior
from ..bayes.registry import make_vtvc
from ..bayes.router import RouterFit, make_flat_twin, tuned_point_estimate, tuned_router
from ..bayes.svi import FitResult, fit_svi
from ..compose.engine import Composer
from ..compose.heads import TaskHeads
from ..config import DEFAULT_BANK, LEGACY_SETTINGS, FitConfig, SVIConfig
from ..data.split import Split, few_shot_rows
from ..data.suite import TaskData
from ..diagnostics import site_events, to_inference_data
from ..evaluate import (
    apply_temperature,
    bootstrap_intervals,
    classification_metrics,
    fit_temperature,
    paired_bootstrap,
    per_image_scores,
    selection_accuracy,
)
from ..methods import baselines, merges
from ..run_folder import FORMAT as RUN_FOLDER_FORMAT
from ..run_folder import RunFolder, device_description, environment

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- what a protocol fits on
def open_bank(cfg: FitConfig, progress: bool = False) -> LoadedBank:
    """The bank ``cfg`` names, streamed in its storage dtype; the embedded one is built when missing."""
    if Path(cfg.bank) == Path(DEFAULT_BANK) and not (Path(DEFAULT_BANK) / "manifest.json").is_file():
        if progress:  # the first thing a new user sees: say what is built, where, that it is once, and how long
            print(f"building the embedded bank once into {DEFAULT_BANK} (a tiny CLIP pretrained here and 11 task "
                  "vectors; about 2-4 minutes on 2 CPU cores; later runs reuse it)", file=sys.stderr, flush=True)
        build_embedded_bank(DEFAULT_BANK, progress=progress)
    return load_bank(cfg.bank, dtype=None, stream=True)  # storage dtype (bf16 for imported banks), low peak memory


@dataclass
class Target:
    """Everything a fit reads: the bank (the vectors to compose), the data and its head.

    Attributes:
        label: what the run is about in tables and folder names (the target spec, or ``addition``).
        bank: the bank with only the vectors to compose, on the fit's device.
        tasks: the names of those vectors (``T``).
        task: the data set (in task addition: the union of the tasks' classes, no images).
        head: ``[C, D]`` zero-shot head (task addition: every task's head, stacked).
        data: ``{"train", "val", "test"}`` -> :class:`~vtvc_pyro.data.split.Split` on the device;
            empty until the protocol's ``load``.
        own_vector: the target's own fine-tuned vector (transfer), or the untruncated vectors
            (task addition at low rank); ``None`` when the bank has none.
        data_seed: the seed of the data pools (the bank build's).
        task_index: task addition: ``{split: [N] each image's task}``; ``None`` in transfer.
        heads: task addition: the :class:`~vtvc_pyro.compose.heads.TaskHeads`.
        datasets: task addition: each task's data set, in ``tasks`` order.
    """

    label: str
    bank: LoadedBank
    tasks: list[str]
    task: TaskData
    head: torch.Tensor
    data: dict[str, Split] = field(default_factory=dict)
    own_vector: TaskVectorBank | None = None
    data_seed: int = 0
    task_index: dict[str, torch.Tensor] | None = None
    heads: TaskHeads | None = None
    datasets: list[TaskData] = field(default_factory=list)


def apply_shots(target: Target, shots: int | None, seed: int) -> Target:
    """The few-shot protocol (``--shots``): keep ``shots`` learning images per class (transfer) or per
    task (task addition, ``target.task_index`` set), drawn with ``seed``, and shrink val in proportion
    (:func:`~vtvc_pyro.data.split.few_shot_rows`); test is untouched. ``None``: every image."""
    if shots is None:
        return target
    train, val = target.data["train"], target.data["val"]
    by_task = target.task_index is not None
    rows = few_shot_rows(target.task_index["train"] if by_task else train.labels, val.labels, shots, seed)
    device = train.features.device
    target.data["train"], target.data["val"] = train.rows(rows.train.to(device)), val.rows(rows.val.to(device))
    if by_task:
        target.task_index["train"] = target.task_index["train"][rows.train.to(device)]
        target.task_index["val"] = target.task_index["val"][rows.val.to(device)]
    return target


@dataclass
class BaselineRun:
    """What a protocol's baselines produced.

    Attributes:
        probs: method -> ``{"val": [N_val, C], "test": [N_test, C]}`` class probabilities.
        info: method -> what it chose (rates, λ, steps, val scores).
        routing: method -> routing diagnostics (task addition), else empty.
    """

    probs: dict[str, dict[str, torch.Tensor]]
    info: dict[str, dict]
    routing: dict[str, dict] = field(default_factory=dict)


class FitProtocol:
    """The interface of a protocol; :data:`~vtvc_pyro.protocols.fit.PROTOCOLS` maps names to instances.

    A protocol says what data a fit reads and what its numbers mean; the skeleton of a run (files,
    baselines, SVI, predictive, posterior) is :func:`~vtvc_pyro.protocols.fit.run_fit`'s.
    """

    name = ""
    shot_unit = "class"  # what --shots counts images of

    def label(self, cfg: FitConfig) -> str:
        """What the run is about (metrics' ``target``, the default run folder's name)."""
        raise NotImplementedError

    def select(self, cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
        """The bank, data sets and heads, reading files only (``data`` empty; no forward pass)."""
        raise NotImplementedError

    def load(self, cfg: FitConfig, device: torch.device, progress: bool = False) -> Target:
        """:meth:`select` with every split on ``device`` and its base features."""
        raise NotImplementedError

    def record(self, target: Target) -> dict:
        """What ``config.json``'s run record adds for this protocol."""
        return {}

    def run_baselines(self, cfg: FitConfig, target: Target, progress: bool) -> BaselineRun:
        """The baselines ``cfg.baselines`` names that apply to this protocol."""
        raise NotImplementedError

    def metrics(self, cfg: FitConfig, target: Target, methods: dict, baselines: BaselineRun, vtvc: VTVCFit) -> dict:
        """The content of ``metrics.json`` (no timings); ``methods``: every method's probabilities, VTVC's included."""
        raise NotImplementedError

    def score_test(self, target: Target, probs: torch.Tensor) -> dict:
        """Test metrics of one set of probabilities ``[N_test, C]`` (an exported model's)."""
        raise NotImplementedError

    def describe(self, target: Target, split: str) -> str:
        """``split`` of the target in words (a model card's "averaged over ...")."""
        raise NotImplementedError

    def prediction_head(self, target: Target, task: str | None) -> tuple[torch.Tensor, list[str]]:
        """The ``[C, D]`` head and class names a predictor scores new images with."""
        raise NotImplementedError

    def plan(self, cfg: FitConfig) -> dict:
        """What a run would use, resolved without writing anything (``--dry_run``)."""
        raise NotImplementedError

    def format(self, metrics: dict) -> str:
        """A plain-text results table of ``metrics``."""
        raise NotImplementedError


def run_record(cfg: FitConfig, protocol: FitProtocol, target: Target, device: torch.device) -> dict:
    """``config.json``'s run record: what the run found and where it ran."""
    return {"run_folder": RUN_FOLDER_FORMAT, "argv": sys.argv,
            "prior_settings": make_prior(cfg.prior, **cfg.prior_args).settings(),
            "tasks": target.tasks, **protocol.record(target),
            "bank_fingerprint": target.bank.manifest["base_fingerprint"], "data_seed": target.data_seed,
            "device": device_description(device), "environment": environment()}


# ---------------------------------------------------------------- VTVC from settings and from a run
def build_vtvc(cfg: FitConfig, composer: Composer, head: torch.Tensor, feature_dim: int, components: int = 1):
    """The model and guide ``cfg`` names with ``components`` global compositions (seeded: the guide's
    initial weights depend on ``cfg.seed`` alone)."""
    pyro.set_rng_seed(cfg.seed)
    return make_vtvc(cfg.model, cfg.guide, composer, head, make_prior(cfg.prior, **cfg.prior_args), feature_dim,
                     route_a=cfg.route_a, route_b=cfg.route_b, components=components, routing=cfg.routing,
                     settings=GuideSettings.from_config(cfg))


def fit_config_of(settings: dict, source: str = "the run's config.json") -> FitConfig:
    """The :class:`FitConfig` of a run's recorded settings (keys a newer or older version wrote are
    dropped; settings it does not record take :data:`LEGACY_SETTINGS` or today's defaults, with one
    warning that names them)."""
    known = {f.name for f in dataclasses.fields(FitConfig)}
    svi_known = {f.name for f in dataclasses.fields(SVIConfig)}
    kept = {k: v for k, v in settings.items() if k in known}
    svi = {k: v for k, v in settings.get("svi", {}).items() if k in svi_known}
    # an SVI setting whose default is null (off) is what a run meant before the setting existed
    svi_defaults = SVIConfig()
    missing = sorted(known - set(kept) - set(LEGACY_SETTINGS)) + sorted(
        f"svi.{k}" for k in svi_known - set(svi) if getattr(svi_defaults, k) is not None)
    if missing:
        log.warning("%s does not record %s: using today's defaults for them", source, ", ".join(missing))
    return FitConfig(**{**LEGACY_SETTINGS, **kept, "svi": SVIConfig(**svi)})


def load_guide_from_run(run_dir: str | Path, composer: Composer, head: torch.Tensor, feature_dim: int) -> torch.nn.Module:
    """Rebuild the fitted guide of a run folder (``config.json`` + ``guide.safetensors``) on ``composer``."""
    folder = RunFolder(run_dir)
    state, meta = folder.read_guide()
    settings, _ = folder.read_config()
    components = int(meta.get("components", 1))  # the number the fit chose on val
    _, guide = build_vtvc(fit_config_of(settings, str(folder.config)), composer, head, feature_dim, components)
    guide.load_state_dict(state)
    return guide.eval()


def candidate_components(cfg: FitConfig) -> list[int]:
    """The numbers of compositions to fit: ``cfg.components`` for the hierarchical model with an
    amortized guide; ``[1]`` for the flat model and the global guide, which have one."""
    if cfg.model != "hierarchical" or not GUIDES[cfg.guide]["amortized"]:
        return [1]
    return list(cfg.components)


# ---------------------------------------------------------------- VTVC's fit and predictive
@dataclass
class Draws:
    """Posterior predictive draws on the test split (:func:`~vtvc_pyro.bayes.predictive.sample_draws`).

    ``probs [S, N, C]``; ``local``: ``lam``, ``inclusion`` ``[S, N, T, G]`` and the other per-image
    sites; ``shared``: the global sites ``[S, ...]``.
    """

    probs: torch.Tensor
    local: dict[str, torch.Tensor]
    shared: dict | None


@dataclass
class VTVCFit:
    """What :func:`fit_vtvc` returns: the chosen candidate and its predictions.

    ``methods``: ``vtvc``, the prediction chosen on val (:func:`choose_prediction`), and the other
    beside it: ``vtvc_mean`` (one composed pass at the gated posterior mean) or ``vtvc_mc`` (the
    Monte Carlo predictive, ``eval_samples`` composed passes); each ``{"val", "test"}`` -> ``[N, C]``.
    ``prediction``: which one ``vtvc`` is, and both val NLLs.
    """

    result: FitResult
    guide: torch.nn.Module
    composer: Composer
    methods: dict[str, dict[str, torch.Tensor]]
    draws: Draws
    val_nll_by_setting: dict[tuple[int, float], float]  # (K, learning-rate factor) -> best val NLL
    prediction: dict = field(default_factory=dict)
    steps: int = 0  # the search (each candidate's steps and batch), recorded as the budget
    batch_size: int = 0

    @property
    def chosen(self) -> tuple[int, float]:
        """The winning ``(K, learning-rate factor)``."""
        return min(self.val_nll_by_setting, key=self.val_nll_by_setting.get)

    @property
    def components(self) -> int:
        return self.chosen[0]

    @property
    def val_nll_by_components(self) -> dict[int, float]:
        """Per K, the best val NLL over the learning rates."""
        out: dict[int, float] = {}
        for (k, _), nll in self.val_nll_by_setting.items():
            out[k] = min(out.get(k, math.inf), nll)
        return out

    def svi_summary(self, detailed: bool = True) -> dict:
        """``metrics.json``'s ``svi`` block (``detailed``: with the best val accuracy and the last finite ELBO)."""
        fit = self.result
        out = {"components": self.components, "val_nll_by_components": self.val_nll_by_components,
               "skipped_steps": fit.skipped_steps,
               "lr_factor": self.chosen[1],
               "val_nll_by_setting": {f"K={k}, lr×{f:g}": v for (k, f), v in self.val_nll_by_setting.items()},
               "best_step": fit.best_step, "best_val_nll": fit.best_val_nll}
        if detailed:
            out.update({"best_val_accuracy": fit.best_val_accuracy,
                        "final_elbo": next((e for e in reversed(fit.elbo_trace) if math.isfinite(e)), None)})
        out["val_history"] = fit.val_history
        out["budget"] = {"fits": len(self.val_nll_by_setting), "steps": self.steps, "batch_size": self.batch_size}
        return out


@dataclass
class Candidate:
    """One fitted candidate number of compositions."""

    model: torch.nn.Module
    guide: torch.nn.Module
    result: FitResult


def fit_candidate(cfg: FitConfig, target: Target, composer: Composer, components: int, files, resume: bool,
                  progress: bool, lr_factor: float = 1.0) -> Candidate:
    """One SVI fit with ``components`` compositions and both learning rates × ``lr_factor`` into
    ``files`` (:class:`~vtvc_pyro.run_folder.CandidateFiles`)."""
    train, val = target.data["train"], target.data["val"]
    model, guide = build_vtvc(cfg, composer, target.head, train.features.shape[1], components)
    model, guide = model.to(target.head.device), guide.to(target.head.device)
    resume = resume and files.checkpoint.is_file()  # a candidate the interrupted run had not started starts afresh
    if hasattr(guide, "initialize") and not resume:
        guide.initialize(train.features, seed=cfg.seed)
    svi = replace(cfg.svi, lr=cfg.svi.lr * lr_factor, global_lr=cfg.svi.global_lr * lr_factor)
    fit = fit_svi(model, guide, train, val, svi, checkpoint_path=files.checkpoint, resume=resume,
                  progress=progress, seed=cfg.seed, history_path=files.history,
                  tensorboard_dir=files.tensorboard if cfg.logger == "tensorboard" else None)
    return Candidate(model, guide, fit)


PREDICTIONS = {"mean": "vtvc_mean", "mc": "vtvc_mc"}
"""VTVC's two predictions and their names beside ``vtvc``: one pass at the gated posterior mean,
and the Monte Carlo predictive."""


def choose_prediction(methods: dict[str, dict[str, torch.Tensor]], val_labels: torch.Tensor) -> dict:
    """Which of :data:`PREDICTIONS` is reported as ``vtvc``: the lower val NLL (ties: the one pass,
    which costs one composed forward per image instead of ``eval_samples``).

    Args:
        methods: ``{"vtvc_mean": {"val": [N, C], ...}, "vtvc_mc": {...}}``.

    Returns:
        ``{"vtvc": "mean" | "mc", "val_nll": {"mean": ..., "mc": ...}, "rule": ...}`` (``metrics.json``'s ``prediction``).
    """
    nll = {kind: merges.nll(methods[name]["val"], val_labels) for kind, name in PREDICTIONS.items()}
    chosen = "mean" if nll["mean"] <= nll["mc"] else "mc"
    return {"vtvc": chosen, "val_nll": nll, "rule": "lowest val NLL"}


def predict_vtvc(cfg: FitConfig, model, guide, target: Target, progress: bool) -> tuple[dict, Draws, dict]:
    """Both predictions on val and test, ``vtvc`` the one chosen on val (:func:`choose_prediction`);
    the test draws; the choice."""
    both, draws = {name: {} for name in PREDICTIONS.values()}, None
    for split in ("val", "test"):
        data = target.data[split]
        probs_s, local, shared = sample_draws(model, guide, data.images, data.features, cfg.eval_samples,
                                              cfg.svi.eval_temperature, generator_seed=cfg.seed, classes=data.classes,
                                              progress=progress, desc=f"predictive {split}")
        both["vtvc_mc"][split] = probs_s.mean(0)
        both["vtvc_mean"][split] = mean_probs(model, guide, data.images, data.features, classes=data.classes)
        draws = Draws(probs_s, local, shared)
    choice = choose_prediction(both, target.data["val"].labels)
    chosen = PREDICTIONS[choice["vtvc"]]
    methods = {"vtvc": both[chosen], **{name: probs for name, probs in both.items() if name != chosen}}
    return methods, draws, choice


def fit_vtvc(cfg: FitConfig, target: Target, folder: RunFolder, resume: bool, progress: bool) -> VTVCFit:
    """Fit VTVC by SVI (every candidate number of components × learning-rate factor, the same
    search as the deterministic twins; the lowest val NLL wins), save the chosen guide, and draw
    its predictive on val and test."""
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    settings = [(k, f) for k in candidate_components(cfg) for f in cfg.lr_factors]
    files = {key: folder.candidate(i, *key) for i, key in enumerate(settings)}
    if resume:
        folder.adopt_history(files[settings[0]])
    candidates = {(k, f): fit_candidate(cfg, target, composer, k, files[(k, f)], resume, progress, f)
                  for k, f in settings}
    chosen = min(candidates, key=lambda key: candidates[key].result.best_val_nll)
    best = candidates[chosen]
    folder.write_chosen_history(files[chosen])
    folder.write_guide(best.guide.state_dict(), {"best_step": str(best.result.best_step), "components": str(chosen[0]),
                                                 "lr_factor": f"{chosen[1]:g}"})
    methods, draws, choice = predict_vtvc(cfg, best.model, best.guide, target, progress)
    return VTVCFit(best.result, best.guide, composer, methods, draws,
                   {key: c.result.best_val_nll for key, c in candidates.items()}, choice, cfg.svi.steps,
                   cfg.svi.batch_size)


# ---------------------------------------------------------------- baselines
def _point_estimate_outputs(fit: RouterFit, target: Target) -> tuple[dict, dict]:
    """A deterministic twin's ``{"val", "test"}`` probabilities and what its search chose."""
    probs = {}
    for split in ("val", "test"):
        data = target.data[split]
        probs[split] = mean_probs(fit.model, fit.guide, data.images, data.features, classes=data.classes)
    *history, chosen = fit.history
    return probs, {**chosen, "best_step": fit.best_step, "best_valnll": fit.best_val_nll, "history": history}


def run_router(cfg: FitConfig, target: Target, progress: bool = False) -> tuple[dict, dict, RouterFit]:
    """The deterministic per-sample router (:mod:`vtvc_pyro.bayes.router`) with VTVC's budget and K candidates:
    ``{"val", "test"}`` probabilities, what it chose, and the fit."""
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    fit = tuned_router(composer, target.head, target.data["train"], target.data["val"], cfg.svi,
                       candidate_components(cfg), cfg.hidden, cfg.slab_mean_init, cfg.seed, progress,
                       tuple(cfg.lr_factors))
    probs, info = _point_estimate_outputs(fit, target)
    return probs, info, fit


def run_flat_twin(cfg: FitConfig, target: Target, progress: bool = False) -> tuple[dict, dict]:
    """The flat model's deterministic twin (:func:`~vtvc_pyro.bayes.router.make_flat_twin`) with the
    flat model's search (K = 1, the ``lr_factors`` grid): ``{"val", "test"}`` probabilities and what it chose."""
    composer = Composer(target.bank.model.visual, target.bank.vectors, cfg.granularity)
    prior, settings = make_prior(cfg.prior, **cfg.prior_args), GuideSettings.from_config(cfg)
    train, val = target.data["train"], target.data["val"]
    fit = tuned_point_estimate(
        lambda k: make_flat_twin(composer, target.head, train.features.shape[1], prior, settings, cfg.seed),
        train, val, cfg.svi, [1], cfg.seed, progress, tuple(cfg.lr_factors))
    return _point_estimate_outputs(fit, target)


def run_baselines(cfg: FitConfig, target: Target, names: list[str], progress: bool = False) -> tuple[dict, dict]:
    """``{"val", "test"}`` probabilities of each named baseline that applies, and what each chose.

    Works for task addition too: splits with ``classes`` score every image with its own head.
    """
    test = target.data["test"]
    inputs = baselines.BaselineInputs(
        visual=target.bank.model.visual, vectors=target.bank.vectors, head=target.head,
        train=target.data["train"], val=target.data["val"], test_images=test.images, test_classes=test.classes,
        own_vector=target.own_vector, steps=cfg.svi.steps, batch_size=cfg.svi.batch_size,
        eval_every=cfg.svi.eval_every, seed=cfg.seed, lr_factors=tuple(cfg.lr_factors), progress=progress,
    )
    probs, info = {}, {}
    for name in names:
        if name == "router":
            p, info[name], _ = run_router(cfg, target, progress)
        elif name == "flat_twin":
            p, info[name] = run_flat_twin(cfg, target, progress)
        else:
            p, info[name] = baselines.run_baseline(name, inputs)
        if p is not None:
            probs[name] = p
    return probs, info


# ---------------------------------------------------------------- scores and diagnostics
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


def paired_against(methods: dict[str, dict], labels: torch.Tensor, reference: str = "vtvc",
                   groups: torch.Tensor | None = None, seed: int = 0) -> dict[str, dict]:
    """Every method but ``reference`` against it on the same test images: the paired bootstrap of the
    difference in accuracy and NLL (:func:`~vtvc_pyro.evaluate.paired_bootstrap`; ``groups``: each
    image's task in task addition, where the statistic is the average over tasks)."""
    if reference not in methods:
        return {}
    ref = per_image_scores(methods[reference]["test"], labels)
    return {name: paired_bootstrap(per_image_scores(probs["test"], labels), ref, groups, seed=seed)
            for name, probs in methods.items() if name != reference}


def paired_cell(method_metrics: dict) -> str:
    """``+1.2 [-0.4, +3.0]``: a method's paired accuracy difference against VTVC in percentage points,
    or ``-`` without one."""
    paired = method_metrics.get("paired_vs_vtvc", {}).get("accuracy")
    if not paired:
        return "-"
    lo, hi = (100 * x for x in paired["interval95"])
    return f"{100 * paired['difference']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def percent(x: float | None) -> float:
    """A fraction as percent (NaN for ``None``), for the console tables."""
    return math.nan if x is None else 100 * x


def _selection(inclusion: torch.Tensor, lam: torch.Tensor, target: Target) -> dict | None:
    """Selection accuracy on suite targets, which record the transforms behind every image: the
    image's top-k task vectors by Σ_g inclusion × |E λ| are exactly the k source tasks of its transforms."""
    domains = target.task.domains.get("test")
    if domains is None or not target.task.domain_sources:
        return None
    index = {t: i for i, t in enumerate(target.tasks)}
    domain_tasks = [[index[t] for t in sources if t in index] for sources in target.task.domain_sources]
    scores = (inclusion * lam.mean(0).abs()).sum(-1)  # [N, T]
    by_domain = [scores[domains == d].mean(0).tolist() if (domains == d).any() else [math.nan] * len(target.tasks)
                 for d in range(len(domain_tasks))]
    return {**selection_accuracy(scores, domains, domain_tasks),
            "domains": ["+".join(s) for s in target.task.domain_sources], "score_by_domain": by_domain}


def composition_diagnostics(guide, lam: torch.Tensor, gate: torch.Tensor, target: Target) -> dict:
    """Sparsity and selection of the posterior on the test split (``lam``, ``gate``: ``[S, N, T, G]`` draws)."""
    inclusion = gate.float().mean(0)  # [N, T, G]
    per_task = inclusion.mean((0, 2))
    out = {"mean_inclusion": float(inclusion.mean()), "inclusion_by_task": dict(zip(target.tasks, per_task.tolist())),
           "inclusion_sd_across_tasks": float(per_task.std()) if len(per_task) > 1 else 0.0}
    if hasattr(guide, "summary"):
        s = guide.summary()
        out["global"] = {"mean_inclusion": float(s["inclusion"].mean()), "kept_fraction": float(s["kept"].mean())}
        if "rho_mean" in s:
            out["global"]["use_rate_by_task"] = dict(zip(target.tasks, s["rho_mean"].tolist()))
    selection = _selection(inclusion, lam, target)
    if selection is not None:
        out["selection"] = selection
    return out


# ---------------------------------------------------------------- the posterior's files
def stratified_rows(index: torch.Tensor, total: int) -> torch.Tensor:
    """Up to ``total`` test rows, as many from every task (the first of each), in data set order."""
    tasks = int(index.max()) + 1
    per = total // tasks
    rows = torch.cat([(index == t).nonzero().squeeze(1)[:per] for t in range(tasks)])
    return rows if len(rows) or total <= 0 else (index >= 0).nonzero().squeeze(1)[:total]  # fewer than one per task


def posterior_rows(cfg: FitConfig, target: Target) -> torch.Tensor:
    """The test rows stored in ``posterior.nc``: the first ``cfg.posterior_samples``, or as many of
    every task (task addition)."""
    labels = target.data["test"].labels
    if target.task_index is not None:
        return stratified_rows(target.task_index["test"], cfg.posterior_samples)
    return torch.arange(min(cfg.posterior_samples, len(labels)), device=labels.device)


def posterior_data(cfg: FitConfig, target: Target, vtvc: VTVCFit):
    """The InferenceData of ``posterior.nc``: the test draws of :func:`fit_vtvc` for :func:`posterior_rows`."""
    rows, draws = posterior_rows(cfg, target), vtvc.draws
    image_task = None if target.task_index is None else target.task_index["test"][rows]
    return to_inference_data(
        draws.probs[:, rows], {k: v[:, rows] for k, v in draws.local.items()}, draws.shared,
        target.data["test"].labels[rows], target.tasks, vtvc.composer.group_labels, target.task.class_names,
        vtvc.result.elbo_trace, site_events(make_prior(cfg.prior, **cfg.prior_args)), image_index=rows,
        image_task=image_task, seed=cfg.seed,
        attrs={"target": target.label, "protocol": cfg.protocol, "model": cfg.model, "prior": cfg.prior,
               "guide": cfg.guide, "granularity": cfg.granularity},
    )


def prediction_tensors(target: Target, methods: dict[str, dict]) -> dict[str, torch.Tensor]:
    """``predictions.safetensors``: every method's test probabilities, the labels (and each image's task)."""
    out = {**{name: p["test"].float() for name, p in methods.items()}, "labels": target.data["test"].labels}
    if target.task_index is not None:
        out["task_index"] = target.task_index["test"]
    return out
