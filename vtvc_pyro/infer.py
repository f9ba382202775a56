"""SVI for VTVC: the loop (Pyro's ``svi_torch`` pattern), checkpoints, and the predictive.

The ELBO is an ``nn.Module`` (``Trace_ELBO()(model, guide)``) trained with a torch optimiser:
AdamW, cosine schedule, gradient clipping. Every ``eval_every`` steps the deterministic gated
mean is scored on val and the best guide state is kept (the same protocol as the aTLAS baseline).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .errors import ConfigError
from .guide import AmortizedGatedGuide
from .model import VTVCModel
from .task_vectors import atomic_save

log = logging.getLogger(__name__)

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


def minibatch_indices(num_data: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` mini-batches of indices, shuffled epoch by epoch (no sample repeats within an epoch)."""
    if batch_size <= 0 or steps <= 0 or num_data <= 0:
        raise ConfigError(f"need batch_size > 0, steps > 0 and data; got batch_size={batch_size}, steps={steps}, n={num_data}")
    batch_size = min(batch_size, num_data)
    perm, pos = torch.randperm(num_data, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > num_data:
            perm, pos = torch.randperm(num_data, generator=generator), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if name not in {"cpu"} and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)


@dataclass
class SVIConfig:
    """SVI settings (defaults: the embedded default run)."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 0.01
    kl_weight: float = 0.1
    kl_reduction: str = "mean"
    kl_anneal_steps: int = 0
    num_particles: int = 1
    elbo: str = "trace"
    clip_norm: float = 1.0
    train_temperature: float = 0.1
    eval_temperature: float = 0.01
    eval_every: int = 50
    checkpoint_every: int = 100
    seed: int = 0

    def validate(self) -> None:
        if self.elbo not in ELBOS:
            raise ConfigError(f"unknown ELBO {self.elbo!r}: use one of {sorted(ELBOS)}")
        for name in ("steps", "batch_size", "num_particles", "eval_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lr", "train_temperature", "eval_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kl_reduction not in ("mean", "sum"):
            raise ConfigError(f"kl_reduction must be 'mean' or 'sum', got {self.kl_reduction!r}")
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight must be >= 0, got {self.kl_weight}")


@dataclass
class FitResult:
    elbo_trace: list[float] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_val_accuracy: float = -1.0
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


@torch.no_grad()
def mean_probs(model: VTVCModel, guide: AmortizedGatedGuide, images, features, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities ``[N, C]`` from the deterministic gated mean coefficients."""
    guide.eval()
    out = []
    for i in range(0, len(images), batch_size):
        lam = guide.mean_coefficients(features[i : i + batch_size])
        out.append(torch.softmax(model.logits(images[i : i + batch_size], lam), -1))
    return torch.cat(out)


@torch.no_grad()
def sample_probs(model, guide, images, features, num_samples: int = 20, temperature: float = 0.01,
                 batch_size: int = 256, generator_seed: int | None = None):
    """Monte Carlo predictive.

    Returns:
        ``probs [S, N, C]`` per posterior draw, ``lam [S, N, T, G]`` and ``gate [S, N, T, G]``.
    """
    guide.eval()
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    probs, lams, gates = [], [], []
    for i in range(0, len(images), batch_size):
        lam, gate = guide.sample_coefficients(features[i : i + batch_size], num_samples, temperature)
        probs.append(torch.softmax(model.logits(images[i : i + batch_size], lam), -1))
        lams.append(lam)
        gates.append(gate)
    return torch.cat(probs, 1), torch.cat(lams, 1), torch.cat(gates, 1)


def fit_svi(
    model: VTVCModel,
    guide: AmortizedGatedGuide,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: SVIConfig,
    checkpoint_path: Path | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit the guide by SVI; on return the guide holds the best-on-val state.

    Args:
        train, val: ``(images [N,3,H,W], features [N,D], labels [N])`` on the model's device.
        checkpoint_path: guide state is written there (safetensors) every ``checkpoint_every`` steps.
    """
    cfg.validate()
    pyro.set_rng_seed(cfg.seed)
    pyro.clear_param_store()
    images, features, labels = train
    elbo_cls = ELBOS[cfg.elbo]
    loss_fn = elbo_cls(num_particles=cfg.num_particles, vectorize_particles=cfg.num_particles > 1,
                       max_plate_nesting=1)(model, guide)
    params = [p for p in guide.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    result = FitResult()
    best_state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    bar = tqdm(minibatch_indices(len(images), cfg.batch_size, cfg.steps, g), total=cfg.steps, desc="svi",
               disable=not progress)
    for step, idx in enumerate(bar, 1):
        guide.train()
        idx = idx.to(images.device)
        loss = loss_fn(images[idx], features[idx], labels[idx], num_data=len(images),
                       kl_weight=kl_weight_at(step, cfg, guide.num_tasks * guide.num_groups),
                       temperature=cfg.train_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        sched.step()
        result.elbo_trace.append(-loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = float((mean_probs(model, guide, val[0], val[1]).argmax(-1) == val[2]).float().mean())
            result.val_history.append({"step": step, "elbo": -loss.item(), "val_accuracy": acc})
            bar.set_postfix(elbo=f"{-loss.item():.1f}", val_acc=f"{acc:.3f}")
            if acc > result.best_val_accuracy:
                result.best_val_accuracy, result.best_step = acc, step
                best_state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
        if checkpoint_path is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            atomic_save(guide.state_dict(), checkpoint_path, {"step": str(step)})
    result.seconds = time.time() - start
    result.samples_per_second = cfg.steps * min(cfg.batch_size, len(images)) * cfg.num_particles / max(result.seconds, 1e-9)
    guide.load_state_dict(best_state)
    guide.eval()
    return result
