"""Low-rank task-vector banks: per-matrix truncated SVD, ``ΔW_t ≈ U_t V_t``, stored as factors.

Every weight matrix of the image tower (the linear layers, the patch embedding flattened to
``[width, 3·p·p]`` and the output projection) is factored per task; vectors, norms, embeddings
and the class token stay dense (they are small and not products with the tokens). A block whose
kept rank reaches ``min(out, in)`` is not truncated at all and stays dense too.

Ranks are chosen per task and block, by a fixed ``rank`` or by the fraction of ``energy``
(squared singular values) kept; factors of one block are zero-padded to the largest rank among
its tasks (the zero columns add nothing), so the engine batches the tasks of a block together.

Usage::

    low = truncate_bank(loaded.vectors, rank=8)     # or energy=0.9
    save_low_rank(low, "bank-r8.safetensors")
    low = load_low_rank("bank-r8.safetensors", base=loaded.vectors.base)
    composer = Composer(loaded.model.visual, low)   # picks the low-rank strategy by itself
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BankError, ConfigError
from ..io import fingerprint, save_safetensors
from .task_vectors import DTYPES, TaskVectorBank, read_with_metadata

FORMAT = "vtvc-low-rank-bank/1"
#: blocks that are 2-D or more but are added, not multiplied with the tokens
NOT_MATRICES = ("positional_embedding",)


def is_matrix_block(name: str, shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a block is a weight matrix the engine uses as a linear map (and so may be factored)."""
    return len(shape) >= 2 and name not in NOT_MATRICES


@dataclass
class LowRankBank:
    """Task vectors with the weight matrices stored as truncated-SVD factors.

    Attributes:
        tasks: ``T`` task names.
        base: block name -> ``θ0_b`` float32, for every image-tower tensor.
        dense: block name -> ``[T, *shape]`` for blocks kept dense (storage dtype).
        factors: block name -> ``(U [T, out, r], V [T, r, in])`` with ``ΔW_t ≈ U_t V_t`` in the
            block's own layout flattened to ``[shape[0], prod(shape[1:])]`` (storage dtype; the
            singular values are folded into ``U``).
        shapes: block name -> the block's shape, for every composed block.
        ranks: factored block name -> the kept rank of each task (``T`` ints, ``<= r``).
        kept_energy: factored block name -> fraction of squared singular values kept per task.
        blocks: ``B`` composed block names, in the base's order.
    """

    arch: str
    tasks: list[str]
    base: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    ranks: dict[str, list[int]] = field(default_factory=dict)
    kept_energy: dict[str, list[float]] = field(default_factory=dict)
    base_fingerprint: str = ""
    blocks: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.blocks:
            self.blocks = [n for n in self.base if n in self.dense or n in self.factors]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def block_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U [T, out, r], V [T, r, in])`` of a factored block, ``None`` for a dense one."""
        return self.factors.get(name)

    def block_delta(self, name: str) -> torch.Tensor:
        """``[T, *shape]``: stored dense, or reconstructed ``U V`` (float32) for a factored block."""
        if name in self.dense:
            return self.dense[name]
        u, v = self.factors[name]
        return torch.bmm(u.float(), v.float()).reshape(len(self.tasks), *self.shapes[name])

    def storage_bytes(self) -> int:
        """Bytes of the stored task-vector tensors (dense blocks plus factors)."""
        tensors = [*self.dense.values(), *(t for f in self.factors.values() for t in f)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_dense(self) -> TaskVectorBank:
        """The truncated bank as an ordinary :class:`TaskVectorBank` (float32; tests and small models)."""
        deltas = {n: self.block_delta(n).float() for n in self.blocks}
        return TaskVectorBank(self.arch, list(self.tasks), self.base, deltas, self.base_fingerprint, list(self.blocks))

    def select(self, tasks: Iterable[str]) -> LowRankBank:
        """A bank with only ``tasks`` (factors keep their padded rank)."""
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise BankError(f"task {unknown[0]!r} is not in the bank; it has {self.tasks}")
        idx = [self.tasks.index(t) for t in tasks]
        sel = torch.tensor(idx)
        return LowRankBank(
            self.arch, tasks, self.base, {k: v[sel] for k, v in self.dense.items()},
            {k: (u[sel], v[sel]) for k, (u, v) in self.factors.items()}, dict(self.shapes),
            {k: [r[i] for i in idx] for k, r in self.ranks.items()},
            {k: [e[i] for i in idx] for k, e in self.kept_energy.items()}, self.base_fingerprint, list(self.blocks),
        )

    def to(self, device: str | torch.device) -> LowRankBank:
        return LowRankBank(
            self.arch, self.tasks, {k: v.to(device) for k, v in self.base.items()},
            {k: v.to(device) for k, v in self.dense.items()},
            {k: (u.to(device), v.to(device)) for k, (u, v) in self.factors.items()}, dict(self.shapes),
            dict(self.ranks), dict(self.kept_energy), self.base_fingerprint, list(self.blocks),
        )


def _kept_ranks(s: torch.Tensor, rank: int | None, energy: float | None) -> list[int]:
    """Per-task ranks from singular values ``s [T, k]`` (descending)."""
    k = s.shape[1]
    if rank is not None:
        return [min(rank, k)] * s.shape[0]
    power = s.double() ** 2
    frac = power.cumsum(1) / power.sum(1, keepdim=True).clamp_min(1e-300)
    # smallest r with kept fraction >= energy (an all-zero vector keeps rank 0); rounding slack 1e-9
    return [int(min(k, (f < energy - 1e-9).sum().item() + 1)) if p.sum() > 0 else 0 for f, p in zip(frac, power)]


def truncate_bank(bank: TaskVectorBank, rank: int | None = None, energy: float | None = None,
                  dtype: str | None = None) -> LowRankBank:
    """Truncated SVD of every weight matrix of every task vector.

    Args:
        bank: a dense bank.
        rank: keep this many singular directions per (task, matrix); or
        energy: keep the fewest directions whose squared singular values reach this fraction (0, 1].
        dtype: storage dtype of factors and dense blocks (``float32``, ``bfloat16``, ``float16``);
            default: that of the bank. The SVD itself runs in float32.

    Returns:
        a :class:`LowRankBank`; blocks whose kept rank reaches ``min(out, in)`` stay dense (exact).
    """
    if (rank is None) == (energy is None):
        raise ConfigError("truncate by exactly one of rank=R (an integer >= 1) or energy=E (0 < E <= 1)")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise ConfigError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
    dense, factors, shapes, ranks, kept = {}, {}, {}, {}, {}
    for name in bank.blocks:
        delta = bank.block_delta(name)
        store = DTYPES[dtype] if dtype else delta.dtype
        shapes[name] = tuple(delta.shape[1:])
        if not is_matrix_block(name, delta.shape[1:]):
            dense[name] = delta.to(store)
            continue
        mat = delta.float().flatten(2)  # [T, out, in]
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r_task = _kept_ranks(s, rank, energy)
        r = max(r_task)
        if r >= min(mat.shape[1:]):
            dense[name] = delta.to(store)
            continue
        r = max(r, 1)
        mask = (torch.arange(r, device=s.device)[None, :] < torch.tensor(r_task, device=s.device)[:, None]).float()
        sv = s[:, :r] * mask  # zero the directions beyond each task's own rank
        factors[name] = ((u[:, :, :r] * sv[:, None, :]).to(store).contiguous(), vh[:, :r].to(store).contiguous())
        ranks[name] = r_task
        total = (s.double() ** 2).sum(1).clamp_min(1e-300)
        kept[name] = [round(float(x), 6) for x in ((sv.double() ** 2).sum(1) / total)]
    return LowRankBank(bank.arch, list(bank.tasks), bank.base, dense, factors, shapes, ranks, kept,
                       bank.base_fingerprint, list(bank.blocks))


def save_low_rank(bank: LowRankBank, path: str | Path) -> None:
    """One safetensors file: ``dense.<block>``, ``U.<block>``, ``V.<block>``; the rest in its metadata."""
    tensors = {f"dense.{k}": v for k, v in bank.dense.items()}
    for k, (u, v) in bank.factors.items():
        tensors[f"U.{k}"], tensors[f"V.{k}"] = u, v
    meta = {
        "format": FORMAT, "arch": bank.arch, "base_fingerprint": bank.base_fingerprint,
        "tasks": json.dumps(bank.tasks), "blocks": json.dumps(bank.blocks),
        "shapes": json.dumps({k: list(s) for k, s in bank.shapes.items()}),
        "ranks": json.dumps(bank.ranks), "kept_energy": json.dumps(bank.kept_energy),
    }
    save_safetensors(tensors, path, meta)


def load_low_rank(path: str | Path, base: Mapping[str, torch.Tensor]) -> LowRankBank:
    """Read a low-rank bank written by :func:`save_low_rank`, checked against the base model.

    Args:
        base: the image-tower parameters (``backbone.image_tower_params(model)`` or ``bank.base``).

    Raises:
        BankError: missing, corrupt or foreign file; another base model.
    """
    path = Path(path)
    if not path.is_file():
        raise BankError(f"low-rank bank {path} does not exist: write it with save_low_rank(truncate_bank(...), path)")
    tensors, meta = read_with_metadata(path, "low-rank bank", "write it again")
    if meta.get("format") != FORMAT:
        raise BankError(f"{path} is not a low-rank bank (no '{FORMAT}' metadata); make one with truncate_bank()")
    base = {k: v.float() for k, v in base.items()}
    expected = fingerprint(base)
    if meta["base_fingerprint"] != expected:
        raise BankError(f"low-rank bank {path} was made from base model {meta['base_fingerprint']}, not this one "
                        f"({expected}); load it with the base model of its bank")
    shapes = {k: tuple(s) for k, s in json.loads(meta["shapes"]).items()}
    dense = {k[6:]: v for k, v in tensors.items() if k.startswith("dense.")}
    factors = {k[2:]: (v, tensors["V." + k[2:]]) for k, v in tensors.items() if k.startswith("U.")}
    for name, shape in shapes.items():
        if name not in base or tuple(base[name].shape) != shape:
            raise BankError(f"low-rank bank {path}, block {name}: shape {shape} does not fit the base model")
        if name in factors and factors[name][0].shape[1] * factors[name][1].shape[2] != math.prod(shape):
            raise BankError(f"low-rank bank {path}, block {name}: factor shapes do not multiply to {shape}; write it again")
    return LowRankBank(meta["arch"], json.loads(meta["tasks"]), base, dense, factors, shapes,
                       json.loads(meta["ranks"]), json.loads(meta["kept_energy"]), meta["base_fingerprint"],
                       json.loads(meta["blocks"]))


def relative_error(low: LowRankBank, full: TaskVectorBank) -> float:
    """‖τ_trunc − τ‖ / ‖τ‖ over every block and task of the bank (Frobenius norms)."""
    num = den = 0.0
    for name in full.blocks:
        ref = full.block_delta(name).float()
        num += float((low.block_delta(name).float() - ref).square().sum())
        den += float(ref.square().sum())
    return math.sqrt(num / max(den, 1e-300))
