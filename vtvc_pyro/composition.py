"""The composition engine: an open_clip image tower evaluated with θ_i = θ0 + Σ_t λ_{i,t,g(b)} τ_{t,b}.

Two modes:

* **per-sample** (:meth:`Composer.per_sample`): every sample has its own coefficients. The weights
  of each sample are materialised as a batch (``[M, *shape]``) and the tower is run by a functional
  forward that mirrors open_clip's ``VisionTransformer`` with batched matrix products, so there is
  no Python loop over samples. Exactness against a naive per-sample loop is tested.
* **batch-shared** (:meth:`Composer.shared`): one coefficient set for the whole batch, composed
  once and run through open_clip's own module with ``torch.func.functional_call``.

Coefficients come at a *granularity*: one per (task, block) (``block``), per (task, layer)
(``layer``) or per task (``task``). ``g(b)`` maps a block to its coefficient group.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .errors import ConfigError
from .task_vectors import TaskVectorBank

GRANULARITIES = ("block", "layer", "task")


def _layer_of(block: str) -> str:
    """``layerK`` for transformer block K; ``embed`` before the blocks; ``head`` after (ln_post, proj)."""
    m = re.search(r"resblocks\.(\d+)\.", block)
    if m:
        return f"layer{int(m.group(1))}"
    return "head" if block.startswith(("ln_post", "proj")) else "embed"


def block_groups(blocks: list[str], granularity: str) -> tuple[list[int], list[str]]:
    """Map each block to a coefficient group.

    Returns:
        ``group_of_block`` (``B`` ints) and the ``G`` group labels.
    """
    if granularity == "block":
        return list(range(len(blocks))), list(blocks)
    if granularity == "task":
        return [0] * len(blocks), ["all"]
    if granularity == "layer":
        names = [_layer_of(b) for b in blocks]
        layers = sorted({n for n in names if n.startswith("layer")}, key=lambda n: int(n[5:]))
        labels = [n for n in ("embed", *layers, "head") if n in names]
        return [labels.index(n) for n in names], labels
    raise ConfigError(f"unknown granularity {granularity!r}: use one of {GRANULARITIES}")


class Composer(torch.nn.Module):
    """Composes a bank of task vectors onto an open_clip image tower.

    Args:
        visual: the base ``model.visual`` (its parameters are θ0; they are not modified).
        bank: stacked task vectors of the same architecture.
        granularity: ``block``, ``layer`` or ``task``.

    Usage::

        composer = Composer(model.visual, bank, "block")
        feats = composer.per_sample(images, lam)   # images [M,3,H,W], lam [M,T,G] -> [M,D]
    """

    def __init__(self, visual: torch.nn.Module, bank: TaskVectorBank, granularity: str = "block"):
        super().__init__()
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.bank = bank
        self.granularity = granularity
        group_of_block, self.group_labels = block_groups(bank.blocks, granularity)
        self.group_of_block = dict(zip(bank.blocks, group_of_block))
        self._check_supported()

    # ------------------------------------------------------------ shapes
    @property
    def num_tasks(self) -> int:
        return self.bank.num_tasks

    @property
    def num_groups(self) -> int:
        return len(self.group_labels)

    def _check_supported(self) -> None:
        v = self.visual
        if not hasattr(v, "transformer") or not hasattr(v, "conv1"):
            raise ConfigError(f"{type(v).__name__} is not an open_clip VisionTransformer; the engine composes ViT towers only")
        if getattr(v, "pool_type", "tok") not in ("tok", "avg"):
            raise ConfigError(f"pool_type {v.pool_type!r} is not supported by the per-sample engine; use tok or avg")
        if getattr(v, "attn_pool", None) is not None:
            raise ConfigError("attentional pooling towers are not supported by the per-sample engine; use a plain ViT")
        for blk in v.transformer.resblocks:
            if not isinstance(blk.attn, torch.nn.MultiheadAttention):
                raise ConfigError("custom attention blocks are not supported by the per-sample engine; use a plain ViT")

    def block_coefficients(self, lam: torch.Tensor, name: str) -> torch.Tensor:
        """Coefficients of one block: ``lam [..., T, G]`` -> ``[..., T]``."""
        return lam[..., self.group_of_block[name]]

    # ------------------------------------------------------------ composition
    def composed_params(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ0 + Σ_t λ τ for every composed block.

        Args:
            lam: ``[T, G]`` (shared) or ``[M, T, G]`` (per sample).

        Returns:
            block name -> ``[*shape]`` or ``[M, *shape]``; blocks without a task vector are absent.
        """
        out = {}
        for name, delta in self.bank.deltas.items():
            c = self.block_coefficients(lam, name).to(torch.float32)  # [..., T]
            d = delta.to(torch.float32).flatten(1)  # [T, numel], fp32 compute on low-precision storage
            upd = (c @ d).reshape(*c.shape[:-1], *delta.shape[1:])
            out[name] = self.bank.base[name].to(upd.device) + upd
        return out

    def shared(self, images: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Batch-shared composition: ``images [M,3,H,W]``, ``lam [T,G]`` -> features ``[M,D]``."""
        return functional_call(self.visual, self.composed_params(lam), (images,), strict=False)

    def per_sample(self, images: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Per-sample composition: ``images [M,3,H,W]``, ``lam [M,T,G]`` -> features ``[M,D]``."""
        if lam.dim() != 3 or lam.shape[0] != images.shape[0]:
            raise ConfigError(f"per-sample coefficients must be [M, T, G] with M = {images.shape[0]}, got {tuple(lam.shape)}")
        params = dict(self.visual.named_parameters())
        params.update(self.composed_params(lam))
        return vit_forward(self.visual, params, images)

    def naive_per_sample(self, images: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Reference: compose and run each sample alone through open_clip's module (slow; tests only)."""
        return torch.cat([self.shared(images[i : i + 1], lam[i]) for i in range(len(images))])


# ---------------------------------------------------------------- functional ViT with batched weights
def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x [M, L, in]``; ``w [out, in]`` or ``[M, out, in]``; ``b [out]`` or ``[M, out]``."""
    y = F.linear(x, w) if w.dim() == 2 else torch.bmm(x, w.transpose(1, 2))
    if b is not None:
        y = y + (b if b.dim() == 1 else b[:, None, :])
    return y


def _per_token(p: torch.Tensor) -> torch.Tensor:
    """A ``[D]`` or ``[M, D]`` vector broadcast against ``[M, L, D]``."""
    return p if p.dim() == 1 else p[:, None, :]


def _layer_norm(x: torch.Tensor, ln: torch.nn.Module, prefix: str, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(ln, torch.nn.Identity):
        return x
    y = F.layer_norm(x, x.shape[-1:], eps=ln.eps)
    return y * _per_token(params[prefix + "weight"]) + _per_token(params[prefix + "bias"])


def _attention(x: torch.Tensor, attn: torch.nn.MultiheadAttention, prefix: str, params) -> torch.Tensor:
    m, length, width = x.shape
    heads = attn.num_heads
    qkv = _linear(x, params[prefix + "in_proj_weight"], params[prefix + "in_proj_bias"])
    q, k, v = (t.reshape(m, length, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(m, length, width)
    return _linear(out, params[prefix + "out_proj.weight"], params[prefix + "out_proj.bias"])


def _layer_scale(x: torch.Tensor, ls: torch.nn.Module, prefix: str, params) -> torch.Tensor:
    return x if isinstance(ls, torch.nn.Identity) else x * _per_token(params[prefix + "gamma"])


def vit_forward(visual: torch.nn.Module, params: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer.forward`` (eval, no patch dropout) with optionally per-sample params.

    Args:
        visual: the module, read only for its structure (heads, eps, activation, pooling).
        params: ``visual``-relative name -> tensor, either the shared shape or ``[M, *shape]``.
        images: ``[M, 3, H, W]``.

    Returns:
        image features ``[M, D]`` (before L2 normalisation).
    """
    m = images.shape[0]
    conv_w = params["conv1.weight"]  # [W, 3, p, p] or [M, W, 3, p, p]
    p = visual.conv1.kernel_size
    patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # [M, L, 3*p*p]
    x = _linear(patches, conv_w.flatten(-3), None)  # [M, L, W]
    cls = params["class_embedding"]
    cls = cls.expand(m, -1) if cls.dim() == 1 else cls
    x = torch.cat([cls[:, None, :].to(x.dtype), x], dim=1)
    pos = params["positional_embedding"]
    x = x + pos.to(x.dtype)  # [L+1, W] or [M, L+1, W] both broadcast
    x = _layer_norm(x, visual.ln_pre, "ln_pre.", params)
    for i, blk in enumerate(visual.transformer.resblocks):
        pre = f"transformer.resblocks.{i}."
        h = _attention(_layer_norm(x, blk.ln_1, pre + "ln_1.", params), blk.attn, pre + "attn.", params)
        x = x + _layer_scale(h, blk.ls_1, pre + "ls_1.", params)
        h = _linear(_layer_norm(x, blk.ln_2, pre + "ln_2.", params), params[pre + "mlp.c_fc.weight"], params[pre + "mlp.c_fc.bias"])
        h = _linear(blk.mlp.gelu(h), params[pre + "mlp.c_proj.weight"], params[pre + "mlp.c_proj.bias"])
        x = x + _layer_scale(h, blk.ls_2, pre + "ls_2.", params)
    if visual.final_ln_after_pool:
        pooled, _ = visual._global_pool(x)
        pooled = _layer_norm(pooled[:, None, :], visual.ln_post, "ln_post.", params)[:, 0]
    else:
        pooled, _ = visual._global_pool(_layer_norm(x, visual.ln_post, "ln_post.", params))
    proj = params.get("proj")
    if proj is None:
        return pooled
    return pooled @ proj if proj.dim() == 2 else torch.bmm(pooled[:, None, :], proj)[:, 0]
