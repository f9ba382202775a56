"""Export a composed model as an open_clip state dict that ``open_clip.create_model`` loads.

A composed model is the base CLIP with its image tower replaced by θ0 + Σ_t λ_{t,g(b)} τ_{t,b}
for one batch-shared ``λ [T, G]``: learned shared coefficients (aTLAS-style, task arithmetic), or
the posterior mean of a fitted VTVC guide over a data set, λ̄ = mean_i E_q[λ_i]. The text tower and
logit scale are kept, so the file is a complete CLIP usable for zero-shot classification.

Usage::

    export_composed("composed.safetensors", bank.model, bank.vectors, lam, "block")
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained="composed.safetensors")
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..bank.store import LoadedBank, load_bank
from ..bank.task_vectors import TaskVectorBank
from ..compose.engine import Composer
from ..config import FitConfig, SVIConfig
from ..data.benchmarks import clip_preprocess
from ..data.specs import load_dataset, with_validation
from ..errors import ConfigError
from ..io import save_safetensors
from .transfer import build_vtvc, read_run_config

log = logging.getLogger(__name__)

FORMAT = "vtvc-composed-open-clip/1"


def composed_state_dict(model: torch.nn.Module, bank: TaskVectorBank, lam: torch.Tensor,
                        granularity: str = "block") -> dict[str, torch.Tensor]:
    """The whole CLIP state dict with ``visual.*`` composed from ``lam [T, G]`` (float32, CPU)."""
    composer = Composer(model.visual, bank, granularity)
    expected = (composer.num_tasks, composer.num_groups)
    if tuple(lam.shape) != expected:
        raise ConfigError(f"coefficients must be [T, G] = {list(expected)} for granularity {granularity!r}, "
                          f"got {list(lam.shape)}")
    with torch.no_grad():
        composed = composer.composed_params(lam.to(next(model.parameters()).device))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for name, value in composed.items():
        state[f"visual.{name}"] = value.detach().float().cpu()
    return state


def export_composed(path: str | Path, model: torch.nn.Module, bank: TaskVectorBank, lam: torch.Tensor,
                    granularity: str = "block", metadata: dict | None = None) -> Path:
    """Write the composed CLIP to ``path`` (``.safetensors``, atomically) with provenance metadata.

    The tensor names are open_clip's own, so ``open_clip.create_model(arch, pretrained=path)`` loads
    it (strict). Metadata: format, arch, base fingerprint, tasks, granularity and ``lam`` as JSON.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"export to a .safetensors file (open_clip reads those), not {path.name}")
    meta = {
        "format": FORMAT,
        "arch": bank.arch,
        "base_fingerprint": bank.base_fingerprint,
        "tasks": json.dumps(list(bank.tasks)),
        "granularity": granularity,
        "lam": json.dumps([[round(float(v), 7) for v in row] for row in lam.detach().cpu()]),
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    save_safetensors(composed_state_dict(model, bank, lam, granularity), path, meta)
    log.info("wrote composed %s model to %s", bank.arch, path)
    return path


@torch.no_grad()
def posterior_mean_coefficients(guide: torch.nn.Module, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """λ̄ = mean over a data set of the gated posterior means E_q[λ_i]: ``features [N, D]`` -> ``[T, G]``."""
    if len(features) == 0:
        raise ConfigError("no features to average the posterior over: pass a non-empty split")
    guide.eval()
    total = None
    for i in range(0, len(features), batch_size):
        part = guide.mean_coefficients(features[i : i + batch_size]).sum(0)
        total = part if total is None else total + part
    return total / len(features)


def load_guide_from_run(run_dir: str | Path, composer: Composer, head: torch.Tensor, feature_dim: int) -> torch.nn.Module:
    """Rebuild the fitted guide of a run folder (``config.json`` + ``guide.safetensors``) on ``composer``."""
    run_dir = Path(run_dir)
    guide_path = run_dir / "guide.safetensors"
    if not (run_dir / "config.json").is_file() or not guide_path.is_file():
        raise ConfigError(f"{run_dir} holds no finished fit (config.json, guide.safetensors): run `vtvc fit` first")
    fit, _ = read_run_config(run_dir)
    with safe_open(str(guide_path), "pt") as f:
        components = int((f.metadata() or {}).get("components", 1))  # the number the fit chose on val
    known = {f.name for f in dataclasses.fields(FitConfig)}
    svi_known = {f.name for f in dataclasses.fields(SVIConfig)}
    settings = {k: v for k, v in fit.items() if k in known}
    settings.setdefault("model", "flat")  # runs written before the hierarchical model existed
    cfg = FitConfig(**{**settings, "svi": SVIConfig(**{k: v for k, v in fit.get("svi", {}).items() if k in svi_known})})
    _, guide = build_vtvc(cfg, composer, head, feature_dim, components)
    guide.load_state_dict(load_file(str(guide_path)))
    return guide.eval()


def export_run(run_dir: str | Path, out: str | Path, split: str = "test", progress: bool = False) -> dict:
    """Export a fitted run's posterior mean over ``split`` of its target as an open_clip state dict.

    Returns:
        ``{"path", "arch", "tasks", "lam"}``.
    """
    run_dir = Path(run_dir)
    fit, record = read_run_config(run_dir)
    tasks = record["tasks"]
    full = load_bank(fit["bank"])
    seed = record.get("data_seed", 0)
    task = with_validation(load_dataset(fit["target"], seed, preprocess=clip_preprocess(full.model)), seed)
    bank = LoadedBank(full.path, full.manifest, full.model, full.vectors.select(tasks), full.heads)
    features = bank.features(task, split, fit["target"])
    composer = Composer(bank.model.visual, bank.vectors, fit["granularity"])
    guide = load_guide_from_run(run_dir, composer, bank.head_for(task), features.shape[1])
    lam = posterior_mean_coefficients(guide, features)
    export_composed(out, bank.model, bank.vectors, lam, fit["granularity"],
                    {"source": f"posterior mean over {fit['target']} {split} ({len(features)} images)",
                     "run": str(run_dir)})
    return {"path": str(out), "arch": bank.arch, "tasks": tasks, "lam": lam}
