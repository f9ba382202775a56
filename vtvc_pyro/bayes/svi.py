"""SVI for VTVC: the loop (Pyro's ``svi_torch`` pattern) and its named steps.

The ELBO is an ``nn.Module`` (``Trace_ELBO()(model, guide)``) trained with a torch optimiser:
AdamW, cosine schedule, gradient clipping; the global posterior's constants (the hierarchical
model's ``composition``) are optimised at ``global_lr`` without weight decay, the budget of the
aTLAS baseline's shared coefficients. Every ``eval_every`` steps the Monte Carlo predictive (the one
that is reported, :mod:`.predictive`) is scored on val and the state with the lowest val NLL is kept.
Every step can be watched as it goes: a row of ``history.csv`` (:mod:`vtvc_pyro.bayes.history`) and
the progress bar or, off a terminal, a few plain lines (:mod:`vtvc_pyro.progress`).

Usage::

    fit = fit_svi(model, guide, train, val, SVIConfig(steps=300))   # train, val: Split
    fit.best_step, fit.best_val_nll
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from .. import distributed
from ..config import SVIConfig
from ..data.batches import MinibatchSampler
from ..data.split import Split
from ..errors import ConfigError, FitInterrupted, NumericalError
from ..progress import track
from .checkpoint import load_training_state, save_training_state
from .history import History, elbo_split, kept_fraction
from .predictive import predictive_scores

log = logging.getLogger(__name__)

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}

HISTORY_KEYS = ("elbo_trace", "val_history", "best_step", "best_score", "best_val_accuracy", "best_val_nll")
"""The :class:`FitResult` fields a checkpoint carries."""


@dataclass
class FitResult:
    elbo_trace: list[float] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_score: float = -math.inf
    best_val_accuracy: float = -1.0
    best_val_nll: float = math.inf
    seconds: float = 0.0
    samples_per_second: float = 0.0
    skipped_steps: int = 0  # steps skipped as non-finite (svi.skip_nonfinite)


def kl_weight_at(step: int, cfg: SVIConfig, num_coefficients: int = 1, weight: float | None = None) -> float:
    """Scale of the latent sites' log densities at ``step``.

    ``kl_reduction="mean"`` divides ``kl_weight`` by the number of coefficients per sample (T·G),
    as the authors' development code averages the KL over them; ``"sum"`` is the plain ELBO
    convention. KL annealing ramps linearly from 0 over ``kl_anneal_steps`` (none when 0).
    ``weight``: another base weight than ``cfg.kl_weight`` (the local latents').
    """
    weight = (cfg.kl_weight if weight is None else weight) / (num_coefficients if cfg.kl_reduction == "mean" else 1)
    if cfg.kl_anneal_steps <= 0:
        return weight
    return weight * min(1.0, step / cfg.kl_anneal_steps)


def image_only(guide: Callable) -> Callable:
    """The guide as SVI calls it: with the model's arguments minus ``classes`` and ``labels``.

    The likelihood needs each image's labels and class set (in task addition: which task's head
    scores it, which the stacked-head labels reveal too), but the posterior must infer the
    composition from the image alone, so the guide receives neither.
    """
    def call(images, features, labels=None, *args, classes=None, **kwargs):
        return guide(images, features, None, *args, **kwargs)

    return call


def parameter_groups(guide: torch.nn.Module, cfg: SVIConfig) -> list[dict]:
    """Optimiser groups: the global posterior's constants (``composition.*``) at ``cfg.global_lr``
    without decay; the networks' weight matrices with ``cfg.weight_decay``; their biases (which hold
    the initial posterior) without."""
    named = [(n, p) for n, p in guide.named_parameters() if p.requires_grad]
    composition = [p for n, p in named if n.startswith("composition.")]
    rest = [(n, p) for n, p in named if not n.startswith("composition.")]
    groups = [{"params": [p for n, p in rest if n.endswith("weight")], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in rest if not n.endswith("weight")], "weight_decay": 0.0}]
    if composition:
        groups.append({"params": composition, "weight_decay": 0.0, "lr": cfg.global_lr})
    return [g for g in groups if g["params"]]


def evaluate_checkpoint(model, guide, val: Split, cfg: SVIConfig, score: Callable | None, seed: int) -> dict:
    """The val record of the current state: ``val_score`` (higher is better) plus what it is made of."""
    if score is not None:
        return {"val_score": float(score(model, guide, val))}
    # under torchrun every rank scores the whole val split with the same draws (its own seed), so
    # all ranks keep the same best state, and the same one as a single process would
    scores = predictive_scores(model, guide, val, cfg.val_samples, cfg.eval_temperature, seed)
    return {"val_score": -scores["nll"], "val_nll": scores["nll"], "val_accuracy": scores["accuracy"]}


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a step is never cut in half)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- one fit's state and its steps
@dataclass
class _Fit:
    """What one fit holds from step to step."""

    model: torch.nn.Module
    guide: torch.nn.Module
    train: Split
    val: Split
    cfg: SVIConfig
    seed: int
    loss_fn: Callable
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    global_group: int | None  # the optimiser group of the global posterior's constants, if any
    sampler: MinibatchSampler
    result: FitResult = field(default_factory=FitResult)
    best_state: dict = field(default_factory=dict)
    first: int = 1  # the first step this process runs (after a resume: the checkpoint's step + 1)
    checkpointed: bool = False  # a checkpoint of this fit exists (written, or resumed from)
    multi: bool = False  # under torchrun: data parallel over the guide (see vtvc_pyro.distributed)


@dataclass
class _Step:
    """What one optimisation step measured, and the batch it used (the history's ELBO split reuses it)."""

    elbo: float
    grad_norm: float
    lrs: dict
    parts: tuple[torch.Tensor, ...]
    settings: dict


def elbo_loss(model, guide, cfg: SVIConfig) -> torch.nn.Module:
    """The negative ELBO ``fit_svi`` optimises, as a module called with a batch's ``(images, features,
    labels, num_data=, kl_weight=, temperature=[, classes=])``; a guide that enumerates a discrete
    site (the mixture's component) gets the enumerating ELBO."""
    elbo_cls = TraceEnum_ELBO if getattr(guide, "components", 1) > 1 else ELBOS[cfg.elbo]
    return elbo_cls(num_particles=cfg.num_particles, vectorize_particles=cfg.num_particles > 1,
                    max_plate_nesting=1)(model, image_only(guide))


def step_settings(step: int, cfg: SVIConfig, guide, num_data: int) -> dict:
    """The model's and guide's keyword arguments at ``step``: data size, KL weights, temperature."""
    coefficients = guide.num_tasks * guide.num_groups
    settings = {"num_data": num_data, "kl_weight": kl_weight_at(step, cfg, coefficients),
                "temperature": cfg.train_temperature}
    if cfg.local_kl_weight is not None:
        settings["local_kl_weight"] = kl_weight_at(step, cfg, coefficients, cfg.local_kl_weight)
    return settings


def _start(model, guide, train: Split, val: Split, cfg: SVIConfig, seed: int) -> _Fit:
    """Seed, set up data parallelism, and build the ELBO, optimiser, schedule and sampler."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    multi = distributed.active()
    if multi:
        distributed.broadcast_module(guide)
        torch.manual_seed(seed + 7919 * distributed.rank())  # independent posterior draws per rank
        if cfg.batch_size % distributed.world_size():
            log.warning("batch size %d is not divisible by the world size %d: shards differ in size",
                        cfg.batch_size, distributed.world_size())
    loss_fn = elbo_loss(model, guide, cfg)
    groups = parameter_groups(guide, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    return _Fit(model, guide, train, val, cfg, seed, loss_fn, [p for p in guide.parameters() if p.requires_grad],
                opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps),
                len(groups) - 1 if "lr" in groups[-1] else None,  # the composition group is last when present
                MinibatchSampler(len(train), cfg.batch_size, seed),
                best_state={k: v.detach().clone() for k, v in guide.state_dict().items()}, multi=multi)


def _restore(fit: _Fit, path: Path | None) -> None:
    """Continue ``fit`` from the checkpoint at ``path``."""
    if path is None or not path.is_file():
        raise ConfigError(f"nothing to resume: {path} does not exist; start without --resume")
    saved = load_training_state(path, fit.guide, fit.opt, fit.sched)
    fit.sampler.load(saved["sampler"])
    fit.best_state = saved["best_state"]
    for key, value in saved["history"].items():
        setattr(fit.result, key, value)
    fit.first = saved["step"] + 1
    fit.checkpointed = True
    log.info("resuming at step %d", fit.first)
    if fit.multi and distributed.rank() > 0:  # the checkpoint holds rank 0's RNG state
        torch.manual_seed(fit.seed + 7919 * distributed.rank() + fit.first)


def _batch_loss(fit: _Fit, part: torch.Tensor, settings: dict, num_parts: int) -> torch.Tensor:
    """The negative ELBO of the micro-batch ``part`` (indices), ÷ ``num_parts``; NaN where a
    distribution refused NaN/Inf parameters (a diverging fit)."""
    batch = fit.train.rows(part)
    extra = {} if batch.classes is None else {"classes": batch.classes}
    try:
        return fit.loss_fn(batch.images, batch.features, batch.labels, **settings, **extra) / num_parts
    except ValueError as err:
        if "invalid values" not in str(err):
            raise
        return torch.tensor(float("nan"))


def _backward(fit: _Fit, parts: tuple[torch.Tensor, ...], settings: dict) -> tuple[torch.Tensor, bool, float]:
    """The loss and gradients of one step: ``(loss, finite, gradient norm before clipping)``.

    Gradient accumulation: each micro-batch's ELBO is scaled by num_data / its size, so the mean over
    equal micro-batches is the whole batch's ELBO; backward per micro-batch frees its graph (the
    per-sample composed weights) before the next one.
    """
    loss, finite = None, True
    for part in parts:
        part_loss = _batch_loss(fit, part, settings, len(parts))
        finite = finite and bool(torch.isfinite(part_loss))
        if len(parts) > 1 and finite:
            part_loss.backward()
        loss = part_loss if len(parts) == 1 else part_loss.detach() + (0 if loss is None else loss)
    if fit.multi:  # every rank must take the same branch
        finite = distributed.all_true(finite, fit.train.features.device)
    grad_norm = math.nan
    if finite:
        if len(parts) == 1:
            loss.backward()
        distributed.average_gradients(fit.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(fit.params, fit.cfg.clip_norm))
        finite = math.isfinite(grad_norm)
    return loss, finite, grad_norm


def _optimisation_step(fit: _Fit, step: int, history: History | None) -> _Step:
    """One SVI step on a fresh mini-batch; a non-finite one is skipped or raises (``cfg.skip_nonfinite``)."""
    cfg, guide = fit.cfg, fit.guide
    guide.train()
    idx = distributed.shard(fit.sampler.next()).to(fit.train.features.device)  # images may be a lazy view: features set the device
    fit.opt.zero_grad(set_to_none=True)
    parts = idx.chunk(cfg.accumulate) if cfg.accumulate > 1 else (idx,)
    settings = step_settings(step, cfg, guide, len(fit.train))
    loss, finite, grad_norm = _backward(fit, parts, settings)
    lrs = {"lr": fit.opt.param_groups[0]["lr"],  # the rates this step used (before sched.step)
           "global_lr": None if fit.global_group is None else fit.opt.param_groups[fit.global_group]["lr"]}
    if finite:
        fit.opt.step()
    elif cfg.skip_nonfinite:
        log.warning("skipping step %d: non-finite loss or gradient", step)
        fit.opt.zero_grad(set_to_none=True)
    else:
        if history is not None:
            history.write(step, elbo=-float(loss.item()), grad_norm=grad_norm, **lrs)
        kept = "the last good checkpoint is kept" if fit.checkpointed else "no checkpoint had been written yet"
        raise NumericalError(f"non-finite loss or gradient at SVI step {step} (loss {loss.item()}); {kept}: lower "
                             "--svi.lr, or pass --svi.skip_nonfinite true to skip such steps")
    fit.sched.step()
    elbo = -loss.item()  # NaN for a skipped step: kept in the trace, never written to JSON
    if fit.multi:
        elbo = distributed.mean_scalar(elbo, fit.train.features.device)
    fit.result.elbo_trace.append(elbo)
    return _Step(elbo, grad_norm, lrs, parts, settings)


def _elbo_parts(fit: _Fit, taken: _Step) -> dict:
    """The history's ``log_likelihood`` and ``kl`` of the step's batch: an extra forward, so eval
    steps only; per micro-batch as the loss (each scaled to the whole data set: their mean is the batch's)."""
    splits = []
    for part in taken.parts:
        batch = fit.train.rows(part)
        extra = {} if batch.classes is None else {"classes": batch.classes}
        splits.append(elbo_split(fit.model, image_only(fit.guide), batch.images, batch.features, batch.labels,
                                 **taken.settings, **extra))
    return {"log_likelihood": sum(s[1] for s in splits) / len(splits), "kl": sum(s[2] for s in splits) / len(splits)}


def _evaluate(fit: _Fit, step: int, elbo: float, score: Callable | None) -> dict:
    """Score the current state on val, record it, and keep it if it is the best so far."""
    record = evaluate_checkpoint(fit.model, fit.guide, fit.val, fit.cfg, score, fit.seed)
    result = fit.result
    result.val_history.append({"step": step, "elbo": elbo if math.isfinite(elbo) else None, **record})
    if record["val_score"] > result.best_score:
        result.best_score, result.best_step = record["val_score"], step
        result.best_val_accuracy = record.get("val_accuracy", -1.0)
        result.best_val_nll = record.get("val_nll", math.inf)
        fit.best_state = {k: v.detach().clone() for k, v in fit.guide.state_dict().items()}
    return {k: record.get(k) for k in ("val_nll", "val_accuracy", "val_score")}


def _save(fit: _Fit, path: Path, step: int) -> None:
    """The full training state after ``step`` (rank 0 writes it)."""
    if distributed.is_main():
        history = {k: getattr(fit.result, k) for k in HISTORY_KEYS}
        save_training_state(path, step, fit.guide, fit.best_state, fit.opt, fit.sched, fit.sampler.state(), history)
    fit.checkpointed = True


def _checkpoint_or_stop(fit: _Fit, step: int, stop: _StopRequest, path: Path | None) -> None:
    """Write the checkpoint when it is due or a signal arrived; then stop on that signal."""
    if fit.multi and distributed.any_true(stop.signal is not None, fit.train.features.device):
        stop.signal = stop.signal or "SIGTERM"  # a signal on any rank stops all of them at this step
    if path is not None and (step % fit.cfg.checkpoint_every == 0 or step == fit.cfg.steps or stop.signal):
        _save(fit, path, step)
    if stop.signal:
        saved = "checkpoint written; continue with --resume" if path else "no checkpoint was asked for"
        raise FitInterrupted(f"{stop.signal} at SVI step {step}: {saved}", stop.signal)


def _finish(fit: _Fit, seconds: float) -> FitResult:
    """Load the best state into the guide and fill in the throughput."""
    result = fit.result
    result.skipped_steps = sum(not math.isfinite(e) for e in result.elbo_trace)
    if result.skipped_steps > fit.cfg.steps // 2:
        raise NumericalError(f"{result.skipped_steps} of {fit.cfg.steps} SVI steps were skipped as non-finite: the fit "
                             "is not usable; lower --svi.lr or --svi.clip_norm")
    result.seconds = seconds
    done = fit.cfg.steps - fit.first + 1
    result.samples_per_second = (done * min(fit.cfg.batch_size, len(fit.train)) * fit.cfg.num_particles
                                 / max(seconds, 1e-9))
    fit.guide.load_state_dict(fit.best_state)
    fit.guide.eval()
    return result


def fit_svi(model, guide, train: Split, val: Split, cfg: SVIConfig, checkpoint_path: Path | None = None,
            resume: bool = False, progress: bool = True, score: Callable | None = None, seed: int = 0,
            history_path: Path | None = None, tensorboard_dir: Path | None = None) -> FitResult:
    """Fit the guide by SVI; on return the guide holds the best-on-val state.

    Args:
        train, val: on the model's device; their ``classes`` (each image's class set) reach the
            likelihood only: the guide never sees them (:func:`image_only`).
        checkpoint_path: the full training state (guide, optimizer, scheduler, RNG, sampler,
            history) is written there every ``checkpoint_every`` steps and on SIGINT/SIGTERM.
        resume: continue from ``checkpoint_path``; with the same seed the result equals an
            uninterrupted fit's.
        seed: seeds Pyro, the mini-batch order and the posterior draws.
        score: ``score(model, guide, val) -> float``, higher is better, selects the best state
            (default: minus the val NLL of the Monte Carlo predictive with ``cfg.val_samples`` draws,
            whose NLL and accuracy are recorded too).
        progress: show the steps (:func:`~vtvc_pyro.progress.track`; rank 0 only).
        history_path: ``history.csv`` (:mod:`vtvc_pyro.bayes.history`): one row per step, written as
            the fit goes (rank 0 only); with ``resume`` the rows up to the checkpoint's step are kept.
        tensorboard_dir: also write the same scalars as TensorBoard events there (rank 0 only).

    Raises:
        NumericalError: the loss or a gradient is NaN/Inf (unless ``cfg.skip_nonfinite``); the
            checkpoint on disk is the last good one.
        FitInterrupted: SIGINT/SIGTERM arrived; the checkpoint holds the last finished step.
    """
    cfg.validate()
    if not isinstance(train, Split) or not isinstance(val, Split):
        raise TypeError("fit_svi takes train and val as vtvc_pyro.data.split.Split(images, features, labels[, classes])")
    fit = _start(model, guide, train, val, cfg, seed)
    if resume:
        _restore(fit, checkpoint_path)
    start = time.time()
    desc = f"svi K={guide.components}" if hasattr(guide, "components") else "svi"  # candidates tell apart
    bar = track(range(fit.first, cfg.steps + 1), desc, total=cfg.steps,
                initial=fit.first - 1, enabled=progress and distributed.is_main())
    watched = distributed.is_main() and (history_path is not None or tensorboard_dir is not None)
    history = History(history_path, fit.first, tensorboard_dir) if watched else None
    with _StopRequest() as stop, history or contextlib.nullcontext():
        for step in bar:
            taken = _optimisation_step(fit, step, history)
            row = {"elbo": taken.elbo, "grad_norm": taken.grad_norm, **taken.lrs}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                if history is not None:
                    row.update(_elbo_parts(fit, taken))
                row.update(_evaluate(fit, step, taken.elbo, score))
                bar.set_postfix(elbo=f"{taken.elbo:.1f}", val=f"{row['val_score']:.3f}")
            if history is not None:
                history.write(step, **row, kept_fraction=kept_fraction(guide))
            _checkpoint_or_stop(fit, step, stop, checkpoint_path)
    return _finish(fit, time.time() - start)
