"""Task vectors: build, save/load as safetensors with metadata, import checkpoints, stack into a bank.

A task vector is ``finetuned - base`` for every floating-point parameter tensor ("block") of the
image tower, keyed by its ``visual``-relative name (``transformer.resblocks.0.mlp.c_fc.weight``).
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from ..errors import BankError
from ..io import fingerprint, save_safetensors

log = logging.getLogger(__name__)

FORMAT = "vtvc-task-vector/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_with_metadata(path: Path, what: str, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file.

    Raises:
        BankError: ``"<what> <path> is truncated or corrupt (...); <fix>"``.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise BankError(f"{what} {path} is truncated or corrupt ({err}); {fix}") from err


def image_tower_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image-tower tensors of a CLIP/ImageEncoder state dict, renamed relative to ``visual.``.

    Accepts ``visual.*`` (open_clip CLIP), ``model.visual.*`` (task_vectors ImageEncoder) or names
    that are already relative. Integer tensors (counters, ids) are skipped.
    """
    out = {}
    has_visual = any("visual." in k for k in state)
    for key, value in state.items():
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        if has_visual:
            if "visual." not in key:
                continue
            key = key.split("visual.", 1)[1]
        out[key] = value
    return out


@dataclass
class TaskVector:
    """``deltas``: block name -> ``finetuned - base`` tensor, same shape as the block."""

    task: str
    arch: str
    base_fingerprint: str
    class_names: tuple[str, ...]
    deltas: dict[str, torch.Tensor]

    @classmethod
    def from_state_dicts(
        cls,
        finetuned: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        arch: str,
        task: str,
        class_names: Sequence[str] = (),
    ) -> "TaskVector":
        """Difference of two state dicts (image tower only); shapes must agree block by block."""
        ft, b = image_tower_state(finetuned), image_tower_state(base)
        missing = sorted(set(b) - set(ft))
        if missing:
            raise BankError(f"fine-tuned checkpoint of {task!r} lacks block {missing[0]}: is it the same architecture?")
        for name, value in b.items():
            if ft[name].shape != value.shape:
                raise BankError(
                    f"block {name}: fine-tuned shape {tuple(ft[name].shape)} != base shape {tuple(value.shape)}; "
                    "the two checkpoints come from different architectures"
                )
        deltas = {n: ft[n].float() - b[n].float() for n in b}
        return cls(task, arch, fingerprint(b), tuple(class_names), deltas)

    def save(self, path: str | Path, dtype: str = "float32") -> None:
        """Write as safetensors; metadata holds arch, base fingerprint, task, class names and dtype."""
        if dtype not in DTYPES:
            raise BankError(f"unknown task-vector dtype {dtype!r}: use one of {sorted(DTYPES)}")
        meta = {
            "format": FORMAT,
            "task": self.task,
            "arch": self.arch,
            "base_fingerprint": self.base_fingerprint,
            "class_names": json.dumps(list(self.class_names)),
            "dtype": dtype,
        }
        save_safetensors({k: v.to(DTYPES[dtype]) for k, v in self.deltas.items()}, path, meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        base: Mapping[str, torch.Tensor] | None = None,
        arch: str | None = None,
    ) -> "TaskVector":
        """Read a task vector, checking it against the base model when given.

        Args:
            base: the image-tower parameters the vector must apply to (fingerprint and shapes).
            arch: the expected architecture name.

        Raises:
            BankError: missing, truncated or corrupt file; another architecture or base model
                (naming the first mismatching tensor); NaN or Inf values.
        """
        path = Path(path)
        if not path.is_file():
            raise BankError(f"task vector {path} does not exist: build the bank (`vtvc bank build`) or fix the path")
        deltas, meta = read_with_metadata(path, "task vector", "rebuild or re-import it")
        if meta.get("format") != FORMAT:
            raise BankError(f"{path} is not a vtvc task vector (no '{FORMAT}' metadata); convert it with TaskVector.from_state_dicts(...).save()")
        tv = cls(
            task=meta["task"],
            arch=meta["arch"],
            base_fingerprint=meta["base_fingerprint"],
            class_names=tuple(json.loads(meta.get("class_names", "[]"))),
            deltas={k: v.float() for k, v in deltas.items()},
        )
        if arch is not None and tv.arch != arch:
            raise BankError(f"task vector {path} was built for {tv.arch}, not {arch}; use vectors of the same architecture")
        for name, value in tv.deltas.items():
            if not torch.isfinite(value).all():
                raise BankError(f"task vector {path} has NaN or Inf in block {name}; rebuild it")
        if base is not None:
            for name, value in base.items():
                if name not in tv.deltas:
                    raise BankError(f"task vector {path} lacks block {name}: it comes from another architecture")
                if tv.deltas[name].shape != value.shape:
                    raise BankError(
                        f"task vector {path}, block {name}: shape {tuple(tv.deltas[name].shape)} != base "
                        f"{tuple(value.shape)}; it comes from another architecture"
                    )
            expected = fingerprint(base)
            if tv.base_fingerprint != expected:
                raise BankError(
                    f"task vector {path} was made from base model {tv.base_fingerprint}, not this one "
                    f"({expected}); compose vectors only onto the model they were fine-tuned from"
                )
        return tv


@dataclass
class TaskVectorBank:
    """Task vectors stacked per block, ready for composition.

    Attributes:
        tasks: ``T`` task names, in stacking order.
        blocks: ``B`` block names (blocks whose vectors are all zero are dropped).
        base: block name -> ``θ0_b`` float32, for *every* image-tower tensor.
        deltas: block name -> ``[T, *shape]`` in the storage dtype.
    """

    arch: str
    tasks: list[str]
    base: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    base_fingerprint: str = ""
    blocks: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.blocks:
            self.blocks = list(self.deltas)

    @classmethod
    def stack(
        cls,
        vectors: Sequence[TaskVector],
        base: Mapping[str, torch.Tensor],
        dtype: str = "float32",
    ) -> "TaskVectorBank":
        """Stack vectors of one base model; all-zero blocks are dropped."""
        if not vectors:
            raise BankError("no task vectors to stack: give at least one")
        fps = {v.base_fingerprint for v in vectors}
        if len(fps) > 1:
            raise BankError(f"task vectors come from different base models {sorted(fps)}; stack vectors of one base")
        deltas = {}
        for name in base:
            stacked = torch.stack([v.deltas[name].float() for v in vectors])
            if stacked.abs().amax() > 0:
                deltas[name] = stacked.to(DTYPES[dtype])
        return cls(vectors[0].arch, [v.task for v in vectors], {k: v.float() for k, v in base.items()},
                   deltas, vectors[0].base_fingerprint)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def block_delta(self, name: str) -> torch.Tensor:
        """``[T, *shape]`` task vectors of one block, in the storage dtype."""
        return self.deltas[name]

    def block_factors(self, name: str) -> None:
        """Dense banks have no low-rank factors (see :mod:`vtvc_pyro.bank.low_rank`)."""
        return None

    def storage_bytes(self) -> int:
        """Bytes of the stored task-vector tensors."""
        return sum(t.numel() * t.element_size() for t in self.deltas.values())

    def select(self, tasks: Iterable[str]) -> "TaskVectorBank":
        """A bank with only ``tasks`` (e.g. every task but the target's own)."""
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise BankError(f"task {unknown[0]!r} is not in the bank; it has {self.tasks}")
        idx = torch.tensor([self.tasks.index(t) for t in tasks])
        deltas = {k: v[idx] for k, v in self.deltas.items()}
        deltas = {k: v for k, v in deltas.items() if v.abs().amax() > 0}
        return TaskVectorBank(self.arch, tasks, self.base, deltas, self.base_fingerprint)

    def to(self, device: str | torch.device) -> "TaskVectorBank":
        return TaskVectorBank(
            self.arch, self.tasks, {k: v.to(device) for k, v in self.base.items()},
            {k: v.to(device) for k, v in self.deltas.items()}, self.base_fingerprint, list(self.blocks),
        )


# ---------------------------------------------------------------- pickled checkpoints
class _Placeholder:
    """Stands in for a class whose source code is absent (``src.modeling.ImageEncoder``...)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


class _SourcelessUnpickler(pickle.Unpickler):
    """Resolves classes that import, and replaces those that do not with :class:`_Placeholder`."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"__module__": module})


class _SourcelessPickle:
    """A ``pickle_module`` for ``torch.load`` using :class:`_SourcelessUnpickler`."""

    Unpickler = _SourcelessUnpickler
    load = staticmethod(pickle.load)


def _collect_tensors(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Walk ``nn.Module``-like objects (real or placeholders) and collect parameters and buffers."""
    d = getattr(obj, "__dict__", {})
    for group in ("_parameters", "_buffers"):
        for name, t in (d.get(group) or {}).items():
            if t is not None:
                out[prefix + name] = t.detach() if torch.is_tensor(t) else t
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


def load_pickled_checkpoint(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a pickled checkpoint (task_vectors/aTLAS ``zeroshot.pt``/``finetuned.pt``) as a state dict.

    Unpickling can run arbitrary code, so this refuses unless ``trust`` is set. The classes of the
    pickling project (``src.modeling.ImageEncoder``) need not be importable: missing classes are
    replaced by placeholders and the module tree is walked for its tensors.
    """
    path = Path(path)
    if not trust:
        raise BankError(
            f"{path} is a pickle, and unpickling can run code: pass trust=True only for files from "
            "a source you trust; the result is converted once to safetensors"
        )
    if not path.is_file():
        raise BankError(f"checkpoint {path} does not exist: check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_SourcelessPickle)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise BankError(f"cannot read pickled checkpoint {path} ({err}); is the file complete?") from err
    if isinstance(obj, Mapping):
        state = obj.get("state_dict", obj)
        return {k: v for k, v in state.items() if torch.is_tensor(v)}
    out: dict[str, torch.Tensor] = {}
    _collect_tensors(obj, "", out)
    if not out:
        raise BankError(f"{path} holds a {type(obj).__name__} with no tensors; expected a module or state dict")
    return out
