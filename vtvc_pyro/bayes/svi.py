"""SVI for VTVC: the loop (Pyro's ``svi_torch`` pattern), checkpoints, and the predictive.

The ELBO is an ``nn.Module`` (``Trace_ELBO()(model, guide)``) trained with a torch optimiser:
AdamW, cosine schedule, gradient clipping; the global posterior's constants (the hierarchical
model's ``composition``) are optimised at ``global_lr`` without weight decay, the budget of the
aTLAS baseline's shared coefficients. Every ``eval_every`` steps the Monte Carlo predictive (the one
that is reported) is scored on val and the state with the lowest val NLL is kept. Every step can be
watched as it goes: a row of ``history.csv`` (:mod:`vtvc_pyro.bayes.history`) and the progress bar
or, off a terminal, a few plain lines (:mod:`vtvc_pyro.progress`).
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
from ..errors import ConfigError, FitInterrupted, NumericalError
from ..progress import track
from .checkpoint import load_training_state, save_training_state
from .guide import AmortizedGatedGuide
from .history import History, elbo_split, kept_fraction
from .model import VTVCModel

log = logging.getLogger(__name__)

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


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


def kl_weight_at(step: int, cfg: SVIConfig, num_coefficients: int = 1) -> float:
    """Scale of the latent sites' log densities at ``step``.

    ``kl_reduction="mean"`` divides ``kl_weight`` by the number of coefficients per sample (T·G),
    as the authors' development code averages the KL over them; ``"sum"`` is the plain ELBO
    convention. KL annealing ramps linearly from 0 over ``kl_anneal_steps`` (none when 0).
    """
    weight = cfg.kl_weight / (num_coefficients if cfg.kl_reduction == "mean" else 1)
    if cfg.kl_anneal_steps <= 0:
        return weight
    return weight * min(1.0, step / cfg.kl_anneal_steps)


def unpack(split: tuple) -> tuple:
    """``(images, features, labels, classes)`` of a split given as 3 tensors or 4 (``classes [N, C]``
    bool: the classes each image may take, as in task addition; ``None`` when absent)."""
    images, features, labels, *rest = split
    return images, features, labels, (rest[0] if rest else None)


def image_only(guide: Callable) -> Callable:
    """The guide as SVI calls it: with the model's arguments minus ``classes`` and ``labels``.

    The likelihood needs each image's labels and class set (in task addition: which task's head
    scores it, which the stacked-head labels reveal too), but the posterior must infer the
    composition from the image alone, so the guide receives neither.
    """
    def call(images, features, labels=None, *args, classes=None, **kwargs):
        return guide(images, features, None, *args, **kwargs)

    return call


def _rows(x: torch.Tensor | None, i: int, j: int) -> torch.Tensor | None:
    return None if x is None else x[i:j]


@torch.no_grad()
def mean_probs(model: VTVCModel, guide: AmortizedGatedGuide, images, features, batch_size: int = 256,
               classes: torch.Tensor | None = None) -> torch.Tensor:
    """Class probabilities ``[N, C]`` from the deterministic gated mean coefficients (``classes``: see :func:`unpack`)."""
    guide.eval()
    out = []
    for i in range(0, len(images), batch_size):
        lam = guide.mean_coefficients(features[i : i + batch_size])
        out.append(torch.softmax(model.logits(images[i : i + batch_size], lam, _rows(classes, i, i + batch_size)), -1))
    return torch.cat(out)


def predictive_scores(model, guide, val, num_samples: int, temperature: float, seed: int = 0) -> dict[str, float]:
    """NLL and accuracy of the Monte Carlo predictive on ``val = (images, features, labels[, classes])``.

    The draws use their own seed (common random numbers across checkpoints) and leave the
    training RNG untouched.
    """
    images, features, labels, classes = unpack(val)
    device = features.device  # the features: images may be a lazily decoded view
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probs = sample_probs(model, guide, images, features, num_samples, temperature, generator_seed=seed,
                             classes=classes)[0].mean(0)
    labels = labels.to(probs.device)
    nll = -probs.gather(-1, labels[:, None]).clamp_min(1e-12).log().mean()
    return {"nll": float(nll), "accuracy": float((probs.argmax(-1) == labels).float().mean())}


@torch.no_grad()
def sample_draws(model, guide, images, features, num_samples: int = 20, temperature: float = 0.01,
                 max_copies: int = 512, generator_seed: int | None = None, classes: torch.Tensor | None = None,
                 progress: bool = False, desc: str = "predictive"):
    """Monte Carlo predictive with every posterior site.

    Images are taken in chunks so that at most ``max_copies`` composed towers (draws × images)
    exist at once; the global sites are drawn once and shared by every chunk, so draw ``s`` is one
    joint posterior draw. ``classes [N, C]`` (optional): each image's class set, as in :func:`unpack`.
    ``progress``: show the chunks (:func:`~vtvc_pyro.progress.track`, named ``desc``).

    Returns:
        ``probs [S, N, C]`` per draw, ``local`` (``lam``, ``inclusion`` ``[S, N, T, G]`` and the
        per-image sites, each ``[S, N, ...]``) and ``shared`` (the global sites, ``[S, ...]``).
    """
    batch_size = max(1, max_copies // num_samples)
    guide.eval()
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    probs, chunks, shared = [], [], None
    for i in track(range(0, len(images), batch_size), desc, enabled=progress, leave=False):
        with pyro.validation_enabled(False):  # a diverged fit evaluates to NaN instead of raising (see fit_svi)
            local, shared = guide.sample_posterior(features[i : i + batch_size], num_samples, temperature, shared)
        logits = model.logits(images[i : i + batch_size], local["lam"], _rows(classes, i, i + batch_size))
        probs.append(torch.softmax(logits, -1))
        chunks.append(local)
    local = {name: torch.cat([c[name] for c in chunks], 1) for name in chunks[0]}
    return torch.cat(probs, 1), local, shared


def sample_probs(model, guide, images, features, num_samples: int = 20, temperature: float = 0.01,
                 max_copies: int = 512, generator_seed: int | None = None, classes: torch.Tensor | None = None):
    """:func:`sample_draws` reduced to ``probs [S, N, C]``, ``lam [S, N, T, G]`` and the inclusion ``[S, N, T, G]``."""
    probs, local, _ = sample_draws(model, guide, images, features, num_samples, temperature, max_copies,
                                   generator_seed, classes)
    return probs, local["lam"], local["inclusion"]


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


def evaluate_checkpoint(model, guide, val, cfg: SVIConfig, score: Callable | None, seed: int) -> dict:
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


def fit_svi(
    model: VTVCModel,
    guide: AmortizedGatedGuide,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: SVIConfig,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    score: Callable | None = None,
    seed: int = 0,
    history_path: Path | None = None,
    tensorboard_dir: Path | None = None,
) -> FitResult:
    """Fit the guide by SVI; on return the guide holds the best-on-val state.

    Args:
        train, val: ``(images [N,3,H,W], features [N,D], labels [N])`` on the model's device, plus
            optionally ``classes [N, C]`` bool (each image's class set, for the likelihood only:
            the guide never sees it, :func:`image_only`).
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
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    images, features, labels, classes = unpack(train)
    multi = distributed.active()  # torchrun: data parallel over the guide (see vtvc_pyro.distributed)
    if multi:
        distributed.broadcast_module(guide)
        torch.manual_seed(seed + 7919 * distributed.rank())  # independent posterior draws per rank
        if cfg.batch_size % distributed.world_size():
            log.warning("batch size %d is not divisible by the world size %d: shards differ in size",
                        cfg.batch_size, distributed.world_size())
    # a guide that enumerates a discrete site (the mixture's component) needs the enumerating ELBO
    elbo_cls = TraceEnum_ELBO if getattr(guide, "components", 1) > 1 else ELBOS[cfg.elbo]
    loss_fn = elbo_cls(num_particles=cfg.num_particles, vectorize_particles=cfg.num_particles > 1,
                       max_plate_nesting=1)(model, image_only(guide))
    params = [p for p in guide.parameters() if p.requires_grad]
    groups = parameter_groups(guide, cfg)
    global_group = len(groups) - 1 if "lr" in groups[-1] else None  # the composition group, last when present
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    sampler = MinibatchSampler(len(images), cfg.batch_size, seed)
    result = FitResult()
    best_state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    first = 1
    if resume:
        if checkpoint_path is None or not checkpoint_path.is_file():
            raise ConfigError(f"nothing to resume: {checkpoint_path} does not exist; start without --resume")
        saved = load_training_state(checkpoint_path, guide, opt, sched)
        sampler.load(saved["sampler"])
        best_state = saved["best_state"]
        for key, value in saved["history"].items():
            setattr(result, key, value)
        first = saved["step"] + 1
        log.info("resuming at step %d", first)
        if multi and distributed.rank() > 0:  # the checkpoint holds rank 0's RNG state
            torch.manual_seed(seed + 7919 * distributed.rank() + first)

    def save(step: int) -> None:
        if not distributed.is_main():
            return
        history = {k: getattr(result, k) for k in ("elbo_trace", "val_history", "best_step", "best_score",
                                                     "best_val_accuracy", "best_val_nll")}
        save_training_state(checkpoint_path, step, guide, best_state, opt, sched, sampler.state(), history)

    start = time.time()
    desc = f"svi K={guide.components}" if hasattr(guide, "components") else "svi"  # candidates tell apart
    bar = track(range(first, cfg.steps + 1), desc, total=cfg.steps, initial=first - 1,
                enabled=progress and distributed.is_main())
    watched = distributed.is_main() and (history_path is not None or tensorboard_dir is not None)
    history = History(history_path, first, tensorboard_dir) if watched else None
    with _StopRequest() as stop, history or contextlib.nullcontext():
        for step in bar:
            guide.train()
            idx = distributed.shard(sampler.next()).to(images.device)
            opt.zero_grad(set_to_none=True)
            # gradient accumulation: each micro-batch's ELBO is scaled by num_data / its size, so the
            # mean over equal micro-batches is the whole batch's ELBO; backward per micro-batch
            # frees its graph (the per-sample composed weights) before the next one
            parts = idx.chunk(cfg.accumulate) if cfg.accumulate > 1 else (idx,)
            loss, finite, grad_norm = None, True, math.nan
            settings = {"num_data": len(images), "kl_weight": kl_weight_at(step, cfg, guide.num_tasks * guide.num_groups),
                        "temperature": cfg.train_temperature}
            for part in parts:
                try:
                    extra = {} if classes is None else {"classes": classes[part]}
                    part_loss = loss_fn(images[part], features[part], labels[part], **settings, **extra) / len(parts)
                except ValueError as err:  # a distribution refused NaN/Inf parameters
                    if "invalid values" not in str(err):
                        raise
                    part_loss = torch.tensor(float("nan"))
                finite = finite and bool(torch.isfinite(part_loss))
                if len(parts) > 1 and finite:
                    part_loss.backward()
                loss = part_loss if len(parts) == 1 else part_loss.detach() + (0 if loss is None else loss)
            if multi:  # every rank must take the same branch
                finite = distributed.all_true(finite, features.device)
            if finite:
                if len(parts) == 1:
                    loss.backward()
                distributed.average_gradients(params)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))  # the norm before clipping
                finite = math.isfinite(grad_norm)
            lrs = {"lr": opt.param_groups[0]["lr"],  # the rates this step used (before sched.step)
                   "global_lr": None if global_group is None else opt.param_groups[global_group]["lr"]}
            if not finite:
                if not cfg.skip_nonfinite:
                    if history is not None:
                        history.write(step, elbo=-float(loss.item()), grad_norm=grad_norm, **lrs)
                    raise NumericalError(
                        f"non-finite loss or gradient at SVI step {step} (loss {loss.item()}); the last good "
                        "checkpoint is kept: lower --svi.lr, or pass --svi.skip_nonfinite true to skip such steps"
                    )
                log.warning("skipping step %d: non-finite loss or gradient", step)
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
            sched.step()
            elbo = -loss.item()  # NaN for a skipped step: kept in the trace, never written to JSON
            if multi:
                elbo = distributed.mean_scalar(elbo, features.device)
            result.elbo_trace.append(elbo)
            row = {"elbo": elbo, "grad_norm": grad_norm, **lrs}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                if history is not None:  # an extra forward on the step's mini-batch, so on eval steps only
                    # per micro-batch, as the loss (each is scaled to the whole data set: their mean is the batch's)
                    splits = [elbo_split(model, image_only(guide), images[part], features[part], labels[part],
                                         **settings, **({} if classes is None else {"classes": classes[part]}))
                              for part in parts]
                    row["log_likelihood"] = sum(s[1] for s in splits) / len(splits)
                    row["kl"] = sum(s[2] for s in splits) / len(splits)
                record = evaluate_checkpoint(model, guide, val, cfg, score, seed)
                row.update({k: record.get(k) for k in ("val_nll", "val_accuracy", "val_score")})
                result.val_history.append({"step": step, "elbo": elbo if math.isfinite(elbo) else None, **record})
                bar.set_postfix(elbo=f"{elbo:.1f}", val=f"{record['val_score']:.3f}")
                if record["val_score"] > result.best_score:
                    result.best_score, result.best_step = record["val_score"], step
                    result.best_val_accuracy = record.get("val_accuracy", -1.0)
                    result.best_val_nll = record.get("val_nll", math.inf)
                    best_state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
            if history is not None:
                history.write(step, **row, kept_fraction=kept_fraction(guide))
            if multi and distributed.any_true(stop.signal is not None, features.device):
                stop.signal = stop.signal or "SIGTERM"  # a signal on any rank stops all of them at this step
            if checkpoint_path is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.signal):
                save(step)
            if stop.signal:
                saved = "checkpoint written; continue with --resume" if checkpoint_path else "no checkpoint was asked for"
                raise FitInterrupted(f"{stop.signal} at SVI step {step}: {saved}")
    result.seconds = time.time() - start
    done = cfg.steps - first + 1
    result.samples_per_second = done * min(cfg.batch_size, len(images)) * cfg.num_particles / max(result.seconds, 1e-9)
    guide.load_state_dict(best_state)
    guide.eval()
    return result
