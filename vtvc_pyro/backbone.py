"""open_clip backbones: loading by name, tiny configs, zero-shot heads and image features.

Every backbone, from the embedded tiny CLIP to ViT-L/14, goes through ``open_clip.create_model``,
so one code path serves them all. Tiny configurations live in ``vtvc_pyro/model_configs`` and are
registered with open_clip itself on import.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .errors import BackboneError
from .progress import track

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

#: The embedded default backbone: 16 px images, patch 4, width 64, two layers (32 image-tower tensors).
TINY_MODEL = "vtvc-tiny"


def list_models() -> list[str]:
    """Names of every architecture open_clip can build, the tiny ones included."""
    return open_clip.list_models()


def _drop_random_init_notice(record: logging.LogRecord) -> bool:
    return "initialized randomly" not in record.getMessage()


def create_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build an open_clip CLIP model in float32, eval mode.

    Args:
        name: an open_clip architecture (``"ViT-B-32"``, ``"vtvc-tiny"``) or ``"local-dir:PATH"``.
        pretrained: ``None`` (random init), an open_clip pretrained tag (``"openai"``), or a local
            weights file (``.safetensors``, or ``.pt``/``.bin`` read by open_clip).

    Usage::

        model = create_clip("vtvc-tiny", "bank/base.safetensors")
    """
    if not name.startswith(("local-dir:", "hf-hub:")) and name not in list_models():
        raise BackboneError(
            f"unknown open_clip architecture {name!r}: pick one of open_clip.list_models() "
            f"(e.g. ViT-B-32, {TINY_MODEL}) or pass local-dir:PATH"
        )
    weights_file = pretrained is not None and Path(pretrained).suffix in {".safetensors", ".pt", ".bin", ".pth"}
    if weights_file and not Path(pretrained).is_file():
        raise BackboneError(f"weights file {pretrained} does not exist: check the path or rebuild the bank")
    # open_clip warns on the root logger about random init even when we load the weights ourselves:
    # drop that one record while loading (a filter on the root logger sees only records logged on it)
    root = logging.getLogger()
    root.addFilter(_drop_random_init_notice)
    try:
        if weights_file and pretrained.endswith(".safetensors"):
            model = open_clip.create_model(name, pretrained=None, device=device)
            missing, unexpected = model.load_state_dict(load_file(pretrained, device=str(device)), strict=False)
            if missing or unexpected:
                raise BackboneError(
                    f"{pretrained} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                    "pass the architecture the weights were saved from"
                )
        else:
            model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except BackboneError:
        raise
    except (RuntimeError, OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", ""}
        raise BackboneError(
            f"cannot load {name} weights {pretrained!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            + ("the hub is offline (HF_HUB_OFFLINE): " if offline else "")
            + "download the checkpoint elsewhere and pass its local path (or local-dir:FOLDER) instead"
        ) from err
    finally:
        root.removeFilter(_drop_random_init_notice)
    return model.float().eval()


def image_tower_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The image tower's parameters, ``visual.``-relative names (the task-vector blocks)."""
    return {name: p.detach() for name, p in model.visual.named_parameters()}


def tokenizer_for(model_name: str):
    """The open_clip tokenizer of ``model_name`` (works offline: the BPE vocabulary ships with open_clip)."""
    return open_clip.get_tokenizer(model_name)


@torch.no_grad()
def zero_shot_head(
    model: torch.nn.Module, model_name: str, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Frozen zero-shot classification head (task_vectors / aTLAS convention).

    For each class, every template is encoded by the text tower, the embeddings are L2-normalised,
    averaged and re-normalised; the result is multiplied by ``logit_scale.exp()`` so that
    ``logits = normalize(image_features) @ head.T``.

    Returns:
        head: ``[C, D]`` float32 on the model's device.
    """
    tokenizer = tokenizer_for(model_name)
    device = next(model.parameters()).device
    rows = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows) * model.logit_scale.exp().float()


@torch.no_grad()
def image_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, progress: bool = False,
                   desc: str = "features") -> torch.Tensor:
    """L2-normalised base image features.

    Args:
        images: ``[N, 3, H, W]``.
        progress: show the batches (:func:`~vtvc_pyro.progress.track`, named ``desc``).

    Returns:
        ``[N, D]`` float32.
    """
    device = next(model.parameters()).device
    out = [
        F.normalize(model.encode_image(images[i : i + batch_size].to(device)).float(), dim=-1)
        for i in track(range(0, len(images), batch_size), desc, enabled=progress, leave=False)
    ]
    return torch.cat(out) if out else images.new_zeros(0, model.visual.output_dim)
