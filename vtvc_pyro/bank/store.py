"""The bank folder: base weights, zero-shot heads, task vectors, cached features and a manifest.

Layout::

    BANK/
      manifest.json            arch, seed, base fingerprint, per-task accuracies, build settings
      base.safetensors         the whole base CLIP (image and text towers)
      heads.safetensors        one frozen zero-shot head [C, D] per task and target
      task_vectors/<task>.safetensors
      features/<spec>-<split>.safetensors   cached base image features (guide inputs)

:func:`build_embedded_bank` makes it for the offline suite; :func:`load_bank` reads it back.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file, safe_open

from .. import backbone
from ..config import DEFAULT_BANK, BuildConfig
from ..data import specs, suite
from ..data.suite import TaskData
from ..errors import BankError
from ..io import exclusive, fingerprint, save_safetensors, write_json
from ..progress import track
from . import training
from .task_vectors import TaskVector, TaskVectorBank

log = logging.getLogger(__name__)

def build_embedded_bank(out: str | Path = DEFAULT_BANK, config: BuildConfig | None = None, progress: bool = True,
                        overwrite: bool = False) -> Path:
    """Pretrain the tiny CLIP, fine-tune every source task, write the bank folder.

    A complete bank already at ``out`` (its manifest exists) is reused as it is, unless ``overwrite``.
    """
    out = Path(out)
    cfg = replace(config or BuildConfig(), tasks=list((config and config.tasks) or suite.SOURCES))
    # two processes started at once on a fresh machine: the second waits, then reuses the first's bank
    with exclusive(out.parent / f".{out.name}.lock", wait=True, what=f"the bank {out}"):
        if (out / "manifest.json").is_file() and not overwrite:
            check_suite_version(out, _read_manifest(out / "manifest.json"))
            log.info("reusing bank %s", out)
            return out
        return _build_embedded_bank(out, cfg, progress)


def _build_embedded_bank(out: Path, cfg: BuildConfig, progress: bool) -> Path:
    start = time.time()
    training.seed_everything(cfg.seed)
    model = backbone.create_clip(cfg.arch)
    images, keys = suite.pretraining_corpus(cfg.seed)
    losses = training.pretrain_clip(
        model, cfg.arch, images, keys, steps=cfg.pretrain_steps, batch_size=cfg.batch_size,
        lr=cfg.pretrain_lr, seed=cfg.seed, progress=progress,
    )
    base_visual = backbone.image_tower_params(model)
    fp = fingerprint(base_visual)
    (out / "task_vectors").mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out / "base.safetensors", {"arch": cfg.arch, "base_fingerprint": fp})

    heads, tasks_info = {}, {}
    for name in track(cfg.tasks, "fine-tune tasks", enabled=progress):
        task = specs.load_dataset(name, cfg.seed)
        head = backbone.zero_shot_head(model, cfg.arch, task.class_names, task.templates)
        heads[name] = head
        zs = training.accuracy(model, head, *task.split("test"))
        tuned = copy.deepcopy(model)
        training.finetune_image_tower(
            tuned, head, *task.split("train"), steps=cfg.finetune_steps, batch_size=cfg.batch_size,
            lr=cfg.finetune_lr, seed=cfg.seed, progress=progress, desc=name,
        )
        ft = training.accuracy(tuned, head, *task.split("test"))
        tv = TaskVector.from_state_dicts(tuned.visual.state_dict(), base_visual, cfg.arch, name, task.class_names)
        tv.save(out / "task_vectors" / f"{name}.safetensors", cfg.dtype)
        tasks_info[name] = {
            "zeroshot_accuracy": round(zs, 4),
            "finetuned_accuracy": round(ft, 4),
            "chance": round(1 / len(task.class_names), 4),
            "num_classes": len(task.class_names),
            "file": f"task_vectors/{name}.safetensors",
        }
    targets_info = {}
    for name in suite.TARGETS:
        task = specs.load_dataset(name, cfg.seed)
        heads[name] = backbone.zero_shot_head(model, cfg.arch, task.class_names, task.templates)
        targets_info[name] = {"zeroshot_accuracy": round(training.accuracy(model, heads[name], *task.split("test")), 4)}
    save_safetensors(heads, out / "heads.safetensors")
    manifest = {
        "format": "vtvc-bank/1",
        "suite": suite.VERSION,
        "arch": cfg.arch,
        "base_fingerprint": fp,
        "config": asdict(cfg),
        "pretrain_final_loss": round(sum(losses[-20:]) / 20, 4),
        "tasks": tasks_info,
        "targets": targets_info,
        "build_seconds": round(time.time() - start, 1),
    }
    write_json(out / "manifest.json", manifest)  # written last: its presence marks a complete bank
    return out


@dataclass
class LoadedBank:
    """Everything a fit needs from a bank folder."""

    path: Path
    manifest: dict
    model: torch.nn.Module  # base CLIP, eval mode
    vectors: TaskVectorBank  # every task vector of the bank
    heads: dict[str, torch.Tensor]

    @property
    def arch(self) -> str:
        return self.manifest["arch"]

    def head_for(self, task: TaskData) -> torch.Tensor:
        """The cached head of a suite task, or a fresh zero-shot head from its class names."""
        if task.name in self.heads and self.heads[task.name].shape[0] == len(task.class_names):
            return self.heads[task.name]
        return backbone.zero_shot_head(self.model, self.arch, task.class_names, task.templates)

    def features(self, task: TaskData, split: str, spec: str | None = None, progress: bool = False) -> torch.Tensor:
        """Base image features of a split, cached under ``features/`` (``[N, D]``).

        The cache file records the base model's fingerprint and is recomputed when it was made by
        another model. Streamed splits (benchmarks) go through a ``DataLoader``, sharded over the
        ranks of a ``torch.distributed`` run; rank 0 writes the file. ``progress``: show the
        batches of a computation (:mod:`vtvc_pyro.progress`).
        """
        from .. import distributed

        images, _ = task.split(split)
        key = (spec or task.name).replace("/", "_").replace(":", "_").replace("@", "_")
        path = self.path / "features" / f"{key}-{split}.safetensors"
        fp = self.manifest.get("base_fingerprint", "")
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            cached = load_file(str(path))["features"]
            if len(cached) == len(images) and meta.get("base_fingerprint", fp) == fp:
                return cached
        desc = f"features {key}-{split}"
        if torch.is_tensor(images):
            feats = backbone.image_features(self.model, images, progress=progress, desc=desc)
        else:
            feats = distributed.streamed_features(self.model, images, progress=progress, desc=desc)
        if distributed.is_main():
            save_safetensors({"features": feats}, path, {"base_fingerprint": fp, "split": split, "spec": spec or task.name})
        return feats


def check_task_name(name: str) -> str:
    """A task name is a single plain file-name component (it names ``task_vectors/<name>.safetensors``).

    Raises:
        BankError: for an empty name, ``.``/``..``, a path separator or a control character.
    """
    if (not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\")
            or any(ord(c) < 32 for c in name)):
        raise BankError(f"task name {name!r} is not a plain name (no '/', '\\', '..' or control characters): "
                        "name the task like SUN397 or digits-rotated")
    return name


def _bank_file(path: Path, name: str, info: dict) -> Path:
    """The task vector file of ``name`` as the manifest records it, refused unless it lies in
    ``task_vectors/`` of the bank (a manifest from elsewhere must not make us read any file)."""
    check_task_name(name)
    file = path / info.get("file", f"task_vectors/{name}.safetensors")
    folder = (path / "task_vectors").resolve()
    if file.resolve().parent != folder:
        raise BankError(f"{path / 'manifest.json'}: task {name!r} points at {info.get('file')!r}, outside the bank's "
                        "task_vectors/ folder; rebuild or re-import the bank")
    return file


def _read_manifest(manifest_path: Path) -> dict:
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise BankError(f"{manifest_path} is not valid JSON ({err}); rebuild the bank") from err


def check_suite_version(path: Path, manifest: dict) -> None:
    """Refuse an embedded bank built on another layout of the offline suite: its pretraining and
    fine-tuning data may include what the current suite holds out as ``val`` (built before
    version 2). Imported banks carry no suite and always pass.

    Raises:
        BankError: naming the command that rebuilds it.
    """
    embedded = "pretrain_final_loss" in manifest  # written by build_embedded_bank only
    if embedded and manifest.get("suite", 1) != suite.VERSION:
        raise BankError(f"the embedded bank {path} was built on offline suite version {manifest.get('suite', 1)}, "
                        f"and this version holds out other images ({suite.VERSION}): rebuild it with "
                        f"`vtvc bank build --overwrite --out {path}` (about 3 minutes)")


def load_bank(path: str | Path = DEFAULT_BANK, tasks: list[str] | None = None, dtype: str | None = "float32",
              stream: bool = False) -> LoadedBank:
    """Read a bank folder, checking every task vector against the base model.

    Args:
        dtype: in-memory dtype of the stacked vectors; ``None`` keeps the storage dtype recorded in
            the manifest (``bfloat16`` for banks imported with ``--dtype bfloat16``).
        stream: stack block by block from the memory-mapped safetensors files
            (:func:`stack_streamed`): the peak is the stacked bank plus one block, instead of every
            vector in float32 at once. Same result.
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BankError(f"no bank at {path} (manifest.json missing): run `vtvc bank build --out {path}`")
    manifest = _read_manifest(manifest_path)
    check_suite_version(path, manifest)
    model = backbone.create_clip(manifest["arch"], str(path / "base.safetensors"))
    base = backbone.image_tower_params(model)
    names = tasks if tasks is not None else list(manifest["tasks"])
    dtype = dtype or manifest.get("config", {}).get("dtype", "float32")
    heads = load_file(str(path / "heads.safetensors")) if (path / "heads.safetensors").is_file() else {}
    unknown = [n for n in names if n not in manifest["tasks"]]
    if unknown:
        raise BankError(f"the bank {path} has no task {unknown[0]!r}; it has {', '.join(manifest['tasks'])}")
    files = [_bank_file(path, n, manifest["tasks"][n]) for n in names]
    if stream:
        return LoadedBank(path, manifest, model, stack_streamed(files, base, manifest["arch"], dtype), heads)
    vectors = [TaskVector.load(f, base=base, arch=manifest["arch"]) for f in files]
    return LoadedBank(path, manifest, model, TaskVectorBank.stack(vectors, base, dtype), heads)


def stack_streamed(files: list[Path], base: dict[str, torch.Tensor], arch: str, dtype: str = "bfloat16") -> TaskVectorBank:
    """Stack task-vector files one block at a time, straight into ``dtype``.

    Each file is opened memory-mapped (``safe_open``) and checked like :meth:`TaskVector.load`
    (format, architecture, base fingerprint, block shapes, finite values); only one block of all
    tasks is ever materialised beside the growing stacked bank ``{block: [T, *shape]}``.
    """
    from contextlib import ExitStack

    from .task_vectors import DTYPES, FORMAT

    expected = fingerprint(base)
    with ExitStack() as stack:
        handles, names = [], []
        for f in files:
            if not Path(f).is_file():
                raise BankError(f"task vector {f} does not exist: build or import the bank again")
            try:
                h = stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise BankError(f"task vector {f} is truncated or corrupt ({err}); rebuild or re-import it") from err
            meta = h.metadata() or {}
            if meta.get("format") != FORMAT:
                raise BankError(f"{f} is not a vtvc task vector (no '{FORMAT}' metadata); re-import it")
            if meta.get("arch") != arch:
                raise BankError(f"task vector {f} was built for {meta.get('arch')}, not {arch}; use vectors of one architecture")
            if meta.get("base_fingerprint") != expected:
                raise BankError(f"task vector {f} was made from base model {meta.get('base_fingerprint')}, not this one "
                                f"({expected}); compose vectors only onto the model they were fine-tuned from")
            handles.append(h)
            names.append(meta["task"])
        deltas = {}
        for block, value in base.items():
            rows = []
            for f, h in zip(files, handles):
                if block not in h.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    raise BankError(f"task vector {f} lacks block {block}: it comes from another architecture")
                t = h.get_tensor(block)
                if t.shape != value.shape:
                    raise BankError(f"task vector {f}, block {block}: shape {tuple(t.shape)} != base {tuple(value.shape)}")
                if not torch.isfinite(t).all():
                    raise BankError(f"task vector {f} has NaN or Inf in block {block}; rebuild it")
                rows.append(t.to(DTYPES[dtype]))
            stacked = torch.stack(rows)
            if stacked.abs().amax() > 0:
                deltas[block] = stacked
    return TaskVectorBank(arch, names, {k: v.float() for k, v in base.items()}, deltas, expected)


# ---------------------------------------------------------------- importing published checkpoints
CHECKPOINT_NAMES = ("finetuned.pt", "nonlinear_finetuned.pt", "finetuned.safetensors")
ZEROSHOT_NAMES = ("zeroshot.pt", "nonlinear_zeroshot.pt", "zeroshot.safetensors")


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, a plain torch state dict, or (with ``trust_pickle``) a
    pickled module as task_vectors and aTLAS publish them."""
    import pickle

    from .task_vectors import load_pickled_checkpoint

    path = Path(path)
    if not path.is_file():
        raise BankError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:  # weights_only: plain state dicts load without running any pickled code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        if not trust_pickle:
            raise BankError(f"{path} is a pickled module, and unpickling can run code: pass --trust_pickle "
                            "(trust_pickle=True) only for files from a source you trust") from None
        return load_pickled_checkpoint(path, trust=True)
    if isinstance(obj, dict):
        obj = obj.get("state_dict", obj)
        return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    raise BankError(f"{path} holds a {type(obj).__name__}, not a state dict; pass trust_pickle for pickled modules")


def discover_checkpoints(folder: str | Path) -> tuple[Path | None, dict[str, Path]]:
    """task_vectors/aTLAS layout: ``FOLDER/zeroshot.pt`` and ``FOLDER/<Task>[Val]/finetuned.pt``.

    aTLAS names them ``nonlinear_finetuned.pt`` / ``nonlinear_zeroshot.pt`` (one zero-shot copy per
    task folder). ``<Task>Val`` folders are named ``<Task>`` in the bank.

    Returns:
        the zero-shot checkpoint (or ``None``) and task name -> fine-tuned checkpoint.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BankError(f"checkpoint folder {folder} does not exist: point --checkpoints at e.g. checkpoints/ViT-B-32")
    zeroshot = next((folder / n for n in ZEROSHOT_NAMES if (folder / n).is_file()), None)
    tasks: dict[str, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        ckpt = next((sub / n for n in CHECKPOINT_NAMES if (sub / n).is_file()), None)
        if ckpt is None:
            continue
        name = sub.name.removesuffix("Val")
        tasks[name] = ckpt
        if zeroshot is None:
            zeroshot = next((sub / n for n in ZEROSHOT_NAMES if (sub / n).is_file()), None)
    if not tasks:
        raise BankError(f"no <Task>/finetuned.pt (or nonlinear_finetuned.pt) under {folder}: is it a task_vectors/aTLAS "
                        "checkpoint folder?")
    return zeroshot, tasks


def import_bank(
    out: str | Path,
    arch: str,
    base_weights: str | None,
    finetuned: dict[str, str | Path],
    zeroshot: str | Path | None = None,
    trust_pickle: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert published checkpoints into a bank folder that :func:`load_bank` and ``run_fit`` read.

    Args:
        arch: the open_clip architecture (``ViT-B-32-quickgelu`` for OpenAI weights).
        base_weights: the open_clip weights of the pre-trained CLIP (both towers; the text tower
            builds the zero-shot heads), or ``None`` for a random init (tests only).
        finetuned: task name -> fine-tuned checkpoint (safetensors, state dict or trusted pickle).
        zeroshot: the published zero-shot image encoder the vectors are relative to; when given, its
            image tower replaces the base's (τ = finetuned − zeroshot, exactly as published).
        dtype: storage dtype of the task vectors (``bfloat16`` halves the bank).

    Returns:
        the bank folder (``manifest.json`` written last).
    """
    out = Path(out)
    check_import_target(out, overwrite)
    if not finetuned:
        raise BankError("no fine-tuned checkpoints to import: pass --finetuned NAME=PATH or --checkpoints FOLDER")
    model = backbone.create_clip(arch, base_weights)
    notes = {}
    if zeroshot is not None:
        zs = image_tower_state_of(read_checkpoint(zeroshot, trust_pickle))
        visual = dict(model.visual.named_parameters())
        missing = sorted(set(visual) - set(zs))
        if missing:
            raise BankError(f"zero-shot checkpoint {zeroshot} lacks image-tower block {missing[0]}: is it {arch}?")
        with torch.no_grad():
            diff = max(float((visual[n] - zs[n].float()).abs().max()) for n in visual)
            for n, p in visual.items():
                if zs[n].shape != p.shape:
                    raise BankError(f"zero-shot block {n} has shape {tuple(zs[n].shape)}, {arch} has {tuple(p.shape)}; "
                                    "pass the architecture the checkpoints were trained with")
                p.copy_(zs[n].float())
        notes["zeroshot_vs_base_max_abs_diff"] = diff
        if base_weights is not None and diff > 1e-4:
            log.warning("the zero-shot image tower differs from %s by up to %.3g; the bank uses the zero-shot one",
                        base_weights, diff)
    config = {"source": "import", "base_weights": base_weights, "zeroshot": str(zeroshot) if zeroshot else None, **notes}
    return write_imported_bank(out, model, arch, finetuned, lambda path: read_checkpoint(path, trust_pickle), config,
                               dtype, progress)


def check_import_target(out: Path, overwrite: bool) -> None:
    """Refuse to import over a complete bank unless ``overwrite`` (checked before any heavy work)."""
    if (out / "manifest.json").exists() and not overwrite:
        raise BankError(f"{out} already holds a bank: pass another --out or --overwrite")


def write_imported_bank(out: str | Path, model: torch.nn.Module, arch: str, sources: Mapping[str, object],
                        read: Callable[[object], Mapping[str, torch.Tensor]], config: dict, dtype: str = "float32",
                        progress: bool = True) -> Path:
    """Write the bank folder of an import: ``model`` is the base, ``read(source)`` one fine-tuned state dict.

    Shared by :func:`import_bank` (open_clip / task_vectors checkpoints) and
    :func:`vtvc_pyro.bank.hf.import_hf_bank` (Hugging Face folders). Sources are read one at a time,
    so the peak memory is the base plus one checkpoint.

    Args:
        sources: task name -> checkpoint source (a path, a hub id); ``str(source)`` goes in the manifest.
        read: source -> open_clip state dict (``visual.*`` or ``visual``-relative names).
        config: recorded under the manifest's ``config`` (beside ``seed`` and ``dtype``).
    """
    from ..data.benchmarks import BENCHMARKS

    out = Path(out)
    for name in sources:  # before anything is written: a refused name leaves no half bank
        check_task_name(name)
    base_visual = backbone.image_tower_params(model)
    fp = fingerprint(base_visual)
    (out / "task_vectors").mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out / "base.safetensors", {"arch": arch, "base_fingerprint": fp})
    tasks_info = {}
    for name, source in track(sorted(sources.items()), "import", enabled=progress):
        bench = BENCHMARKS.get(name)
        fixed = bench.class_names(None) if bench and name in ("GTSRB", "MNIST", "SVHN") else ()
        tv = TaskVector.from_state_dicts(read(source), base_visual, arch, name, fixed)
        tv.save(out / "task_vectors" / f"{name}.safetensors", dtype)
        tasks_info[name] = {"file": f"task_vectors/{name}.safetensors", "source": str(source),
                            "norm": round(float(torch.sqrt(sum((d.float() ** 2).sum() for d in tv.deltas.values()))), 4)}
    manifest = {
        "format": "vtvc-bank/1",
        "arch": arch,
        "base_fingerprint": fp,
        "config": {"seed": 0, **config, "dtype": dtype},
        "tasks": tasks_info,
        "targets": {},
    }
    write_json(out / "manifest.json", manifest)  # written last: its presence marks a complete bank
    return out


def image_tower_state_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower of a CLIP / ImageEncoder state dict (``visual.`` relative names)."""
    from .task_vectors import image_tower_state

    return image_tower_state(state)
