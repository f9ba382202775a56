"""Several GPUs or nodes through ``torch.distributed``, launched by ``torchrun``.

Data parallelism over the guide's parameters:

* every rank draws the same global mini-batch (same seed) and keeps its shard ``idx[rank::world]``,
  the rule of ``DistributedSampler`` applied to each global batch, so the union of the shards is
  exactly the batch a one-process run would use;
* each rank's ELBO is scaled by ``num_data / local_batch`` (Pyro's subsampled plate) and the
  gradients are averaged with one ``all_reduce`` per step (what ``DistributedDataParallel`` does),
  so with a batch size divisible by the world size the averaged gradient equals the one-process
  gradient up to the order of floating-point sums;
* validation is sharded by the same rule with summed counts; base features of streamed data sets
  go through a ``DistributedSampler`` and are gathered;
* rank 0 writes every output; ranks > 0 run in a private temporary folder.

One process (no ``torchrun``) leaves every code path as it was.

Usage::

    torchrun --nproc_per_node 4 scripts/svi_fit.py --target benchmark:DTD@/data --bank banks/vit-b-32
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .progress import track
from .run_folder import RunFolder

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a plain one-process run): the rank that writes files."""
    return rank() == 0


def active() -> bool:
    """True when more than one process takes part."""
    return world_size() > 1


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); a no-op otherwise.

    The backend is NCCL when CUDA is present, else gloo. With CUDA each rank uses the GPU
    ``LOCAL_RANK``, so ``--device cuda`` means that rank's own GPU.

    Returns:
        whether a process group is now active.
    """
    if is_initialized():
        return active()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    log.info("rank %d of %d joined (%s)", rank(), world_size(), dist.get_backend())
    return True


def setup_run(out: Path, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """Initialise from ``torchrun``'s environment; ranks > 0 get a private output folder.

    Rank 0 keeps ``out``; other ranks write the same files to a temporary folder removed at exit
    (with ``resume``, the run's config and checkpoint are copied there first).

    Returns:
        ``(out, overwrite)`` for this rank.
    """
    init_from_env()
    if is_main():
        return out, overwrite
    private = Path(tempfile.mkdtemp(prefix=f"vtvc-rank{rank()}-"))
    atexit.register(shutil.rmtree, private, True)
    if resume:
        # every candidate's checkpoint (checkpoint.safetensors, checkpoint-k4.safetensors, ...): all
        # ranks must resume the same fits at the same steps
        folder = RunFolder(out)
        for path in [folder.config, *folder.checkpoints()]:
            if path.is_file():
                shutil.copy2(path, private / path.name)
    return private, True


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global mini-batch: ``indices[rank::world]`` (all of it in one process)."""
    return indices[rank() :: world_size()] if active() else indices


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` on every rank (an all-reduce MIN); ``flag`` itself in one process."""
    if not active():
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` on some rank (an all-reduce MAX); ``flag`` itself in one process."""
    return not all_true(not flag, device)


def mean_scalar(value: float, device: torch.device | str = "cpu") -> float:
    """Mean of a Python number over the ranks."""
    if not active():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over the ranks (a copy; ``t`` is untouched)."""
    t = t.clone()
    if active():
        dist.all_reduce(t)
    return t


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one flat all-reduce).

    A parameter without a gradient on this rank contributes zeros, so every rank reduces the same
    tensors in the same order.
    """
    if not active():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical starting points)."""
    if not active():
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def gather_sharded(local: torch.Tensor, total: int) -> torch.Tensor:
    """Undo ``DistributedSampler(shuffle=False)``: rank r's k-th row is item ``r + k·world``.

    Args:
        local: ``[K, ...]`` this rank's rows (every rank has the same K, the sampler pads).
        total: the data set size N.

    Returns:
        ``[N, ...]`` in data set order, on every rank.
    """
    if not active():
        return local[:total]
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, 1).reshape(-1, *local.shape[1:])[:total]


@torch.no_grad()
def streamed_features(model: torch.nn.Module, images, batch_size: int = 256, num_workers: int = 0,
                      progress: bool = False, desc: str = "features") -> torch.Tensor:
    """L2-normalised base features ``[N, D]`` of a streamed split (``StreamedImages``), in order.

    Images stream through a ``DataLoader``; under ``torchrun`` a ``DistributedSampler`` shards them
    and the rows are gathered on every rank. ``progress``: show the batches (rank 0 only).
    """
    from torch.utils.data.distributed import DistributedSampler

    device = next(model.parameters()).device
    sampler = DistributedSampler(images.dataset, shuffle=False) if active() else None
    loader = images.loader(batch_size, sampler=sampler, num_workers=num_workers)
    rows = [F.normalize(model.encode_image(x.to(device)).float(), dim=-1)
            for x, _ in track(loader, desc, enabled=progress and is_main(), leave=False)]
    local = torch.cat(rows) if rows else torch.zeros(0, model.visual.output_dim, device=device)
    return gather_sharded(local, len(images))

