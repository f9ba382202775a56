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
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import backbone, training
from .data import specs, suite
from .data.suite import TaskData
from .errors import BankError
from .task_vectors import TaskVector, TaskVectorBank, atomic_save, fingerprint

log = logging.getLogger(__name__)

DEFAULT_BANK = Path(os.environ.get("VTVC_BANK", "banks/embedded"))


@dataclass
class BuildConfig:
    """Settings of the embedded bank (defaults build in about 2.5 minutes on 2 CPU cores)."""

    arch: str = backbone.TINY_MODEL
    seed: int = 0
    pretrain_steps: int = 1000
    pretrain_lr: float = 2e-3
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    batch_size: int = 128
    tasks: tuple[str, ...] = suite.SOURCES
    dtype: str = "float32"


def write_json(path: Path, obj) -> None:
    """JSON through a temporary name and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def build_embedded_bank(out: str | Path = DEFAULT_BANK, config: BuildConfig | None = None, progress: bool = True) -> Path:
    """Pretrain the tiny CLIP, fine-tune every source task, write the bank folder.

    A complete bank already at ``out`` (its manifest exists) is reused as it is.
    """
    out = Path(out)
    cfg = config or BuildConfig()
    if (out / "manifest.json").is_file():
        log.info("reusing bank %s", out)
        return out
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
    atomic_save(model.state_dict(), out / "base.safetensors", {"arch": cfg.arch, "base_fingerprint": fp})

    heads, tasks_info = {}, {}
    for name in tqdm(cfg.tasks, desc="fine-tune tasks", disable=not progress):
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
    atomic_save(heads, out / "heads.safetensors")
    manifest = {
        "format": "vtvc-bank/1",
        "arch": cfg.arch,
        "base_fingerprint": fp,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
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

    def features(self, task: TaskData, split: str, spec: str | None = None) -> torch.Tensor:
        """Base image features of a split, cached under ``features/`` (``[N, D]``)."""
        images, _ = task.split(split)
        key = (spec or task.name).replace("/", "_").replace(":", "_")
        path = self.path / "features" / f"{key}-{split}.safetensors"
        if path.is_file():
            cached = load_file(str(path))["features"]
            if len(cached) == len(images):
                return cached
        feats = backbone.image_features(self.model, images)
        atomic_save({"features": feats}, path)
        return feats


def load_bank(path: str | Path = DEFAULT_BANK, tasks: list[str] | None = None, dtype: str = "float32") -> LoadedBank:
    """Read a bank folder, checking every task vector against the base model."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BankError(f"no bank at {path} (manifest.json missing): run scripts/build_bank.py --out {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise BankError(f"{manifest_path} is not valid JSON ({err}); rebuild the bank") from err
    model = backbone.create_clip(manifest["arch"], str(path / "base.safetensors"))
    base = backbone.image_tower_params(model)
    names = tasks if tasks is not None else list(manifest["tasks"])
    vectors = [TaskVector.load(path / manifest["tasks"][n]["file"], base=base, arch=manifest["arch"]) for n in names]
    heads = load_file(str(path / "heads.safetensors")) if (path / "heads.safetensors").is_file() else {}
    return LoadedBank(path, manifest, model, TaskVectorBank.stack(vectors, base, dtype), heads)
