"""Hugging Face ``transformers`` CLIP checkpoints (safetensors only) as open_clip weights and as a bank.

fusion_bench publishes its fine-tuned image encoders as ``CLIPVisionModel`` folders
(``tanganke/clip-vit-base-patch32_<task>``) over the base ``openai/clip-vit-base-patch32`` (a
``CLIPModel``). This module reads such folders (or hub ids already in the local cache) without
``transformers`` and without unpickling: ``config.json`` plus ``model.safetensors`` (or its shards).
HF's names are mapped onto open_clip's ``VisionTransformer`` (and, for a ``CLIPModel``, the text tower):
HF (under ``vision_model.`` / ``text_model.``) -> open_clip (under ``visual.`` / the CLIP's top level)::

    embeddings.class_embedding                  -> class_embedding
    embeddings.position_embedding.weight        -> positional_embedding
    embeddings.patch_embedding.weight           -> conv1.weight
    embeddings.token_embedding.weight (text)    -> token_embedding.weight
    pre_layrnorm, post_layernorm                -> ln_pre, ln_post
    final_layer_norm (text)                     -> ln_final
    encoder.layers.i.self_attn.{q,k,v}_proj     -> transformer.resblocks.i.attn.in_proj_{weight,bias} (q, k, v stacked)
    encoder.layers.i.self_attn.out_proj         -> transformer.resblocks.i.attn.out_proj
    encoder.layers.i.layer_norm1, layer_norm2   -> transformer.resblocks.i.ln_1, ln_2
    encoder.layers.i.mlp.fc1, fc2               -> transformer.resblocks.i.mlp.c_fc, c_proj
    visual_projection.weight, text_projection.weight -> proj, text_projection (transposed)
    logit_scale                                 -> logit_scale

transformers >= 5 writes a ``CLIPVisionModel`` without the ``vision_model.`` prefix; both read the same.

A ``CLIPVisionModel`` has no visual projection (fusion_bench fine-tunes the vision transformer and
keeps the base's projection frozen). A checkpoint without one takes the base's projection, so its
task vector is zero on ``proj``; the base's comes from ``--hf_base`` when that has one
(``CLIPModel``, ``CLIPVisionModelWithProjection``), else from the open_clip ``--base`` weights.

Usage::

    import_hf_bank("banks/vit-b-32-hf", "ViT-B-32-quickgelu",
                   {"SUN397": "tanganke/clip-vit-base-patch32_sun397"}, base="openai/clip-vit-base-patch32")
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file

from .. import backbone
from ..errors import BankError, ConfigError
from .store import check_import_target, write_imported_bank

log = logging.getLogger(__name__)

#: transformers' defaults for config keys that older ``config.json`` files leave out.
VISION_DEFAULTS = {"hidden_act": "quick_gelu", "num_attention_heads": 12, "layer_norm_eps": 1e-5}
TEXT_DEFAULTS = {"hidden_act": "quick_gelu", "num_attention_heads": 8, "layer_norm_eps": 1e-5}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
#: fusion_bench's task names that differ from the benchmark names of :mod:`vtvc_pyro.data.benchmarks`.
TASK_ALIASES = {"stanford-cars": "Cars", "stanford_cars": "Cars", "stanfordcars": "Cars"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class HFCheckpoint:
    """One ``transformers`` CLIP checkpoint in open_clip names.

    Attributes:
        visual: ``visual``-relative image-tower tensors (``proj`` only if the checkpoint has a projection).
        text: CLIP top-level text-tower tensors and ``logit_scale`` (``CLIPModel`` only), else ``None``.
        vision_config: the vision part of ``config.json`` (``vision_config`` of a ``CLIPModel``).
        text_config: the text part, or ``None``.
    """

    source: str
    visual: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor] | None
    vision_config: dict
    text_config: dict | None

    @property
    def has_projection(self) -> bool:
        return "proj" in self.visual


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in {"0", "", "false", "no", "off"}


def resolve_folder(source: str | Path) -> Path:
    """A local folder, or a hub id (``owner/name``) looked up in the local Hugging Face cache.

    Under ``HF_HUB_OFFLINE`` the hub is never contacted; otherwise only ``config.json`` and the
    safetensors files of a hub id are downloaded.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise BankError(f"{source} is a file: pass the transformers checkpoint folder that holds config.json")
    if not _HUB_ID.match(text):
        raise BankError(f"Hugging Face checkpoint folder {source} does not exist: check the path, or pass a hub id "
                        "(owner/name) already in the local cache")
    from huggingface_hub import errors, snapshot_download

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x

    offline = _offline()
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except incomplete as err:
        # the hub lists files the cache lacks; what the import needs may be there all the same
        if err.snapshot_path and (Path(err.snapshot_path) / "config.json").is_file():
            return Path(err.snapshot_path)
        raise BankError(f"the cached copy of {text} is incomplete: download it again "
                        f"(`hf download {text} config.json model.safetensors`)") from err
    except (errors.LocalEntryNotFoundError, errors.HFValidationError, OSError) as err:
        if offline:
            raise BankError(f"{text} is neither a folder nor a hub id in the local Hugging Face cache (HF_HUB_OFFLINE is "
                            f"set): download it first (`hf download {text} config.json model.safetensors`) or pass "
                            "its folder") from err
        raise BankError(f"cannot get {text} from the Hugging Face hub ({type(err).__name__}); download it elsewhere "
                        "and pass its folder") from err


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise BankError(f"{folder} lacks shard {shard} named in {index.name}: download the whole checkpoint")
            state.update(load_file(str(folder / shard)))
        return state
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return load_file(str(others[0]))
    pickled = [n for n in PICKLE_FILES if (folder / n).is_file()]
    if pickled:
        raise BankError(f"{folder} holds only pickled weights ({pickled[0]}), and vtvc never unpickles: download its "
                        "model.safetensors, or convert it once where you trust the file "
                        "(`CLIPVisionModel.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`)")
    raise BankError(f"no model.safetensors in {folder}: is it a transformers CLIP checkpoint folder?")


def _configs(config: dict, folder: Path) -> tuple[dict, dict | None]:
    kind = config.get("model_type")
    if kind == "clip":
        return {**VISION_DEFAULTS, **config.get("vision_config", {})}, {**TEXT_DEFAULTS, **config.get("text_config", {})}
    if kind == "clip_vision_model":
        return {**VISION_DEFAULTS, **config}, None
    raise BankError(f"{folder}/config.json has model_type {kind!r}, not a CLIP model ('clip' or 'clip_vision_model'): "
                    "only transformers CLIPModel / CLIPVisionModel checkpoints can be imported")


def _map_layers(state: dict[str, torch.Tensor], hf: str, oc: str, used: set[str]) -> dict[str, torch.Tensor]:
    """The encoder layers under ``hf`` (``vision_model.encoder.layers``) as open_clip resblocks under ``oc``."""
    out = {}
    layers = sorted({int(k[len(hf) + 1:].split(".")[0]) for k in state if k.startswith(hf + ".")})
    for i in layers:
        src, dst = f"{hf}.{i}", f"{oc}.{i}"
        for kind in ("weight", "bias"):
            qkv = [f"{src}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            if all(k in state for k in qkv):
                out[f"{dst}.attn.in_proj_{kind}"] = torch.cat([state[k] for k in qkv])
                used.update(qkv)
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                key = f"{src}.{a}.{kind}"
                if key in state:
                    out[f"{dst}.{b}.{kind}"] = state[key]
                    used.add(key)
    return out


def _rename(state: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]], used: set[str],
            transpose: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    out = {}
    for hf, oc in pairs:
        if hf in state:
            out[oc] = state[hf].t().contiguous() if hf in transpose else state[hf]
            used.add(hf)
    return out


def to_open_clip(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict, dict | None]:
    """HF CLIP tensors -> ``(visual, text)`` open_clip tensors (see the module's table).

    Raises:
        BankError: a floating-point tensor of a tower that has no open_clip counterpart (another
            architecture variant); the message names it.
    """
    state = {k.removeprefix("clip_model."): v for k, v in state.items()}  # some wrappers nest the CLIPModel
    if not any(k.startswith(("vision_model.", "text_model.")) for k in state):
        # transformers >= 5 saves a CLIPVisionModel without the vision_model. prefix that 4.x (fusion_bench) writes
        state = {k if k.startswith("visual_projection.") else f"vision_model.{k}": v for k, v in state.items()}
    used: set[str] = set()
    v = "vision_model."
    visual = _rename(state, [
        (v + "embeddings.class_embedding", "class_embedding"),
        (v + "embeddings.position_embedding.weight", "positional_embedding"),
        (v + "embeddings.patch_embedding.weight", "conv1.weight"),
        (v + "pre_layrnorm.weight", "ln_pre.weight"), (v + "pre_layrnorm.bias", "ln_pre.bias"),
        (v + "post_layernorm.weight", "ln_post.weight"), (v + "post_layernorm.bias", "ln_post.bias"),
        ("visual_projection.weight", "proj"),
    ], used, transpose=("visual_projection.weight",))
    visual.update(_map_layers(state, v + "encoder.layers", "transformer.resblocks", used))
    text = None
    if any(k.startswith("text_model.") for k in state):
        t = "text_model."
        text = _rename(state, [
            (t + "embeddings.token_embedding.weight", "token_embedding.weight"),
            (t + "embeddings.position_embedding.weight", "positional_embedding"),
            (t + "final_layer_norm.weight", "ln_final.weight"), (t + "final_layer_norm.bias", "ln_final.bias"),
            ("text_projection.weight", "text_projection"), ("logit_scale", "logit_scale"),
        ], used, transpose=("text_projection.weight",))
        text.update(_map_layers(state, t + "encoder.layers", "transformer.resblocks", used))
    left = sorted(k for k, x in state.items() if k not in used and x.is_floating_point() and not k.endswith("position_ids"))
    if left:
        raise BankError(f"{source}: tensor {left[0]} has no open_clip counterpart ({len(left)} such); only the plain "
                        "CLIP ViT (CLIPModel / CLIPVisionModel[WithProjection]) can be imported")
    if not visual:
        raise BankError(f"{source} has no vision_model.* tensors: is it a CLIP image encoder?")
    return visual, text


def read_hf_clip(source: str | Path) -> HFCheckpoint:
    """Read a ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` folder or cached hub id."""
    folder = resolve_folder(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BankError(f"{folder} has no config.json: pass a transformers checkpoint folder (save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise BankError(f"{config_path} is not valid JSON ({err}); download the checkpoint again") from err
    vision_cfg, text_cfg = _configs(config, folder)
    visual, text = to_open_clip(_weights_of(folder), str(source))
    return HFCheckpoint(str(source), visual, text, vision_cfg, text_cfg if text is not None else None)


def _activation(tower: torch.nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    act = tower.transformer.resblocks[0].mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    return type(act).__name__


def _other_arch(arch: str) -> str:
    return arch.removesuffix("-quickgelu") if arch.endswith("-quickgelu") else f"{arch}-quickgelu"


def check_tower(tower: torch.nn.Module, params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                cfg: dict, arch: str, what: str, optional: Sequence[str] = ()) -> None:
    """Check that HF ``tensors`` and ``cfg`` fit an open_clip tower (activation, heads, eps, names, shapes).

    Args:
        tower: the open_clip module holding ``transformer.resblocks`` (``model.visual`` or ``model``).
        params: that tower's open_clip parameters, named as ``tensors`` are.
        optional: open_clip names the checkpoint may lack (the projection).
    """
    if not hasattr(tower, "transformer") or not hasattr(tower.transformer, "resblocks"):
        raise BankError(f"{arch} is not a plain open_clip CLIP ViT ({type(tower).__name__}): {what} cannot map onto it")
    act, want = cfg.get("hidden_act"), _activation(tower)
    if act != want:
        hint = (f"pass --arch {_other_arch(arch)}" if {act, want} == {"gelu", "quick_gelu"}
                else "only gelu and quick_gelu CLIPs map onto open_clip")
        raise BankError(f"{what} uses hidden_act {act!r} but {arch} builds {want!r}: {hint}")
    block = tower.transformer.resblocks[0]
    heads = getattr(block.attn, "num_heads", None)
    if heads is not None and cfg.get("num_attention_heads") != heads:
        raise BankError(f"{what} has {cfg.get('num_attention_heads')} attention heads but {arch} has {heads}: pass the "
                        "open_clip architecture of the same size")
    eps = getattr(block.ln_1, "eps", None)
    if eps is not None and abs(float(cfg.get("layer_norm_eps", eps)) - eps) > 1e-12:
        raise BankError(f"{what} has layer_norm_eps {cfg.get('layer_norm_eps')} but {arch} uses {eps}")
    missing = sorted(set(params) - set(tensors) - set(optional))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise BankError(f"{what} does not fit {arch}: " + (f"no tensor for {missing[0]} " if missing else "")
                        + (f"{extra[0]} has no place " if extra else "")
                        + f"({len(missing)} missing, {len(extra)} extra): pass the architecture it was trained as")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise BankError(f"{what}, {name}: shape {tuple(value.shape)} but {arch} has {tuple(params[name].shape)}: "
                            "pass the architecture it was trained as (image size, patch, width, layers)")


def check_vision(model: torch.nn.Module, ckpt: HFCheckpoint, arch: str) -> None:
    """:func:`check_tower` for the image tower (the projection may be absent)."""
    params = dict(model.visual.named_parameters())
    check_tower(model.visual, params, ckpt.visual, ckpt.vision_config, arch, ckpt.source, optional=("proj",))


def check_text(model: torch.nn.Module, ckpt: HFCheckpoint, arch: str) -> None:
    """:func:`check_tower` for a ``CLIPModel``'s text tower and ``logit_scale``."""
    params = {n: p for n, p in model.named_parameters() if not n.startswith("visual.")}
    check_tower(model, params, ckpt.text or {}, ckpt.text_config or {}, arch, f"{ckpt.source} (text tower)")


def task_names(sources: Sequence[str], base: str | None = None) -> dict[str, str]:
    """Task name -> source for ``--hf_vision`` items (``NAME=PATH`` or a folder / hub id).

    An unnamed item is named after its folder: without the base's name as a prefix
    (``clip-vit-base-patch32_sun397`` over ``clip-vit-base-patch32`` is ``sun397``), then as the
    benchmark it names, case-insensitively (``sun397`` -> ``SUN397``, ``stanford-cars`` -> ``Cars``).
    """
    from ..data.benchmarks import BENCHMARKS

    canonical = {name.lower(): name for name in BENCHMARKS} | TASK_ALIASES
    prefix = Path(str(base).rstrip("/")).name + "_" if base else None
    out: dict[str, str] = {}
    for item in sources:
        name, sep, path = str(item).partition("=")
        if not sep or not name or "/" in name:
            name, path = Path(str(item).rstrip("/")).name, str(item)
            if prefix and name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix):]
            name = canonical.get(name.lower(), name)
        if name in out:
            raise ConfigError(f"two --hf_vision checkpoints are named {name!r} ({out[name]}, {path}): name them "
                              "NAME=PATH")
        out[name] = path
    return out


def import_hf_bank(
    out: str | Path,
    arch: str,
    vision: Mapping[str, str | Path],
    base: str | Path | None = None,
    base_weights: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Import fine-tuned HF ``CLIPVisionModel`` checkpoints as a bank that :func:`load_bank` reads.

    Args:
        arch: the open_clip architecture; its activation must match the checkpoints'
            (``ViT-B-32-quickgelu`` for OpenAI's ``quick_gelu`` CLIPs).
        vision: task name -> fine-tuned HF folder or cached hub id (see :func:`task_names`).
        base: the HF checkpoint the vectors are relative to (``openai/clip-vit-base-patch32``): its
            image tower replaces the base's; a ``CLIPModel`` also brings the text tower and logit
            scale unless ``base_weights`` is given.
        base_weights: open_clip weights of the pre-trained CLIP (text tower, and the projection a
            vision-only ``base`` lacks); ``None`` keeps open_clip's random init for what ``base``
            does not hold (tests only: the zero-shot heads then mean nothing).

    Returns:
        the bank folder (``manifest.json`` written last).
    """
    out = Path(out)
    check_import_target(out, overwrite)
    if not vision:
        raise BankError("no fine-tuned checkpoints to import: pass --hf_vision [DIR_OR_ID,...] (or NAME=DIR_OR_ID)")
    model = backbone.create_clip(arch, base_weights)
    fallback = "base_weights" if base_weights else "random"
    notes = {"source": "import-hf", "base_weights": base_weights, "hf_base": str(base) if base else None,
             "projection": fallback, "text_tower": fallback}
    if base is not None:
        ref = read_hf_clip(base)
        check_vision(model, ref, arch)
        with torch.no_grad():
            params = dict(model.visual.named_parameters())
            for name, value in ref.visual.items():
                params[name].copy_(value.float())
            if ref.has_projection:
                notes["projection"] = "hf_base"
            if ref.text is not None and base_weights is None:
                check_text(model, ref, arch)
                top = dict(model.named_parameters())
                for name, value in ref.text.items():
                    top[name].copy_(value.float())
                notes["text_tower"] = "hf_base"
    if notes["projection"] == "random":
        log.warning("no visual projection in %s and no --base weights: the bank's projection is random", base)
    if notes["text_tower"] == "random":
        log.warning("no text tower (a CLIPModel --hf_base or open_clip --base weights): zero-shot heads will be random")
    base_proj = model.visual.proj.detach()

    def read(source):
        ckpt = read_hf_clip(source)
        check_vision(model, ckpt, arch)
        # a CLIPVisionModel has no projection: the base's is kept, so τ is zero there
        return ckpt.visual if ckpt.has_projection else {**ckpt.visual, "proj": base_proj}

    return write_imported_bank(out, model, arch, dict(vision), read, notes, dtype, progress)
