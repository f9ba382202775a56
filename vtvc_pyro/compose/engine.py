"""The composition engine: an open_clip image tower evaluated with θ_i = θ0 + Σ_t λ_{i,t,g(b)} τ_{t,b}.

Modes:

* **per-sample** (:meth:`Composer.per_sample`): every sample has its own coefficients. The tower
  is run by a functional forward that mirrors open_clip's ``VisionTransformer``; vectors (biases,
  norms, class token, positional embedding) are composed per sample directly (``[M, *shape]``),
  and every weight matrix goes through one of three exact strategies, chosen per layer:

  - ``lowrank`` (banks from :func:`~vtvc_pyro.bank.low_rank.truncate_bank`): ``ΔW_t = U_t V_t``, so
    ``y = W0 x + Σ_t λ_t U_t (V_t x)``, all tasks in two matrix products of width ``T·r``;
    it costs ``T·r·(in + out)`` per token instead of ``out·in``.
  - ``materialize``: per-sample weights ``W_i = W0 + Σ_t λ_it ΔW_t`` built in chunks of samples;
    a custom autograd function rebuilds them in backward instead of keeping ``M`` copies.
  - ``linear``: ``y = W0 x + Σ_t λ_t (ΔW_t x)``; wins where a sample has few tokens (the output
    projection sees one).

  ``auto`` (the default) takes ``lowrank`` wherever the bank has factors and otherwise the
  cheaper of the other two by a cost model (:meth:`Composer.choose`). Every strategy is exact with
  respect to the bank it is given (for a low-rank bank: the truncated vectors) and is tested
  against :meth:`Composer.naive_per_sample`.
* **batch-shared** (:meth:`Composer.shared`): one coefficient set for the whole batch, composed
  once and run through open_clip's own module with ``torch.func.functional_call``.

Task vectors may be stored in bfloat16/float16: compute is float32, and a block is converted only
while its layer runs (never the whole bank at once).

Coefficients come at a *granularity*: one per (task, block) (``block``), per (task, layer)
(``layer``) or per task (``task``). ``g(b)`` maps a block to its coefficient group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..bank.low_rank import LowRankBank
from ..bank.task_vectors import TaskVectorBank
from ..errors import ConfigError

GRANULARITIES = ("block", "layer", "task")
STRATEGIES = ("auto", "lowrank", "materialize", "linear")
#: cost of building one per-sample weight, in multiples of one ``out·in`` multiply-add per token:
#: ``materialize`` costs about ``T + MATERIALIZE_OVERHEAD`` of them per sample, ``linear``
#: ``T·L`` (``L`` tokens). Building a weight is bound by memory traffic (write and re-read
#: ``out·in`` floats, twice with backward), hence the constant; benchmarked in docs/benchmarks.md.
MATERIALIZE_OVERHEAD = 32
#: working memory of one chunk of per-sample weights (``materialize``, kept by the composer as its
#: workspace) or of task outputs (``linear``, transient)
CHUNK_BYTES = 256 * 2**20


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


def matrix_blocks(visual: torch.nn.Module) -> set[str]:
    """Names of the tower's weight matrices, the blocks :func:`vit_forward` applies as linear maps."""
    names = {"conv1.weight"}
    if getattr(visual, "proj", None) is not None:
        names.add("proj")
    for i in range(len(visual.transformer.resblocks)):
        pre = f"transformer.resblocks.{i}."
        names.update(pre + k for k in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
    return names


def _linear_view(name: str, t: torch.Tensor, lead: int) -> torch.Tensor:
    """A weight (after ``lead`` leading dims) as the ``[out, in]`` matrix of a linear map.

    ``conv1.weight [W, 3, p, p]`` acts on flattened patches; ``proj [W, D]`` is applied as
    ``x @ proj`` and so is transposed.
    """
    if name == "proj":
        return t.transpose(-1, -2)
    return t.flatten(lead + 1) if t.dim() > lead + 2 else t


class Composer(torch.nn.Module):
    """Composes a bank of task vectors onto an open_clip image tower.

    Args:
        visual: the base ``model.visual`` (its parameters are θ0; they are not modified).
        bank: stacked task vectors of the same architecture, dense (:class:`TaskVectorBank`) or
            low-rank (:class:`~vtvc_pyro.bank.low_rank.LowRankBank`).
        granularity: ``block``, ``layer`` or ``task``.
        strategy: per-sample strategy for the weight matrices, one of :data:`STRATEGIES`
            (``auto``: low-rank where the bank has factors, else by :meth:`choose`).
        chunk_bytes: working memory of one chunk of per-sample weights or task outputs.

    Usage::

        composer = Composer(model.visual, bank, "block")
        feats = composer.per_sample(images, lam)   # images [M,3,H,W], lam [M,T,G] -> [M,D]
    """

    def __init__(self, visual: torch.nn.Module, bank: TaskVectorBank | LowRankBank, granularity: str = "block",
                 strategy: str = "auto", chunk_bytes: int = CHUNK_BYTES):
        super().__init__()
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.bank = bank
        self.granularity = granularity
        group_of_block, self.group_labels = block_groups(bank.blocks, granularity)
        self.group_of_block = dict(zip(bank.blocks, group_of_block))
        self._check_supported()
        self.strategy = self._check_strategy(strategy)
        self.chunk_bytes = int(chunk_bytes)
        self.matrices = matrix_blocks(self.visual)
        self._lowrank_cache: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._workspace: torch.Tensor | None = None
        self._largest = max(self.visual.get_parameter(n).numel() for n in self.matrices)

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

    def _check_strategy(self, strategy: str) -> str:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown composition strategy {strategy!r}: use one of {STRATEGIES}")
        if strategy == "lowrank" and not any(self.bank.block_factors(b) is not None for b in self.bank.blocks):
            raise ConfigError("the lowrank strategy needs a low-rank bank: make one with vtvc_pyro.bank.low_rank.truncate_bank")
        return strategy

    @torch.no_grad()
    def component_scales(self) -> torch.Tensor:
        """``[T, G]``: the size ‖τ_t,g‖ of each component's task vector (Frobenius norm over the group's
        blocks) relative to the mean size of the T task vectors in that group.

        A coefficient λ_tg changes the weights by λ_tg ‖τ_t,g‖, so ``|λ_tg| · scale_tg`` compares
        components of large and small task vectors on one footing (the keep rule's importance).
        A group whose vectors are all zero gets scale 1.
        """
        sq = torch.zeros(self.num_tasks, self.num_groups, dtype=torch.float64)
        for name in self.bank.blocks:
            delta = self.bank.block_delta(name).double().flatten(1)  # [T, numel]
            sq[:, self.group_of_block[name]] += delta.pow(2).sum(-1).cpu()
        norms = sq.sqrt()
        mean = norms.mean(0, keepdim=True)
        return torch.where(mean > 0, norms / mean.clamp_min(1e-30), torch.ones_like(norms)).float()

    def block_coefficients(self, lam: torch.Tensor, name: str) -> torch.Tensor:
        """Coefficients of one block: ``lam [..., T, G]`` -> ``[..., T]``."""
        return lam[..., self.group_of_block[name]]

    # ------------------------------------------------------------ strategy choice
    def choose(self, name: str, tokens: int, strategy: str | None = None) -> str:
        """The strategy of one weight matrix for ``tokens`` tokens per sample.

        Returns ``base`` (no task vector), ``lowrank``, ``materialize`` or ``linear``. A forced
        ``materialize`` or ``linear`` is taken as it is; ``lowrank`` where the bank has factors
        (other blocks as ``auto``); ``auto`` the cheapest by this cost model, in multiply-adds per
        sample on top of the base product (``T`` tasks, ``L`` tokens, ``W [out, in]``, rank ``r``):

        - ``lowrank``: ``L·T·r·(in + out)``;
        - ``materialize``: ``(T + MATERIALIZE_OVERHEAD)·out·in`` (building weights is bound by
          memory traffic, hence the constant);
        - ``linear``: ``L·T·out·in``.

        Factored blocks pay ``T·r·out·in`` per call to rebuild the dense vectors for the last two.
        """
        strategy = strategy or self.strategy
        if name not in self.group_of_block:
            return "base"
        if strategy in ("materialize", "linear"):
            return strategy
        factors = self.bank.block_factors(name)
        if factors is not None and strategy == "lowrank":
            return "lowrank"
        t = self.num_tasks
        out_f, in_f = _linear_view(name, self.visual.get_parameter(name), 0).shape
        costs = {"materialize": (t + MATERIALIZE_OVERHEAD) * out_f * in_f, "linear": tokens * t * out_f * in_f}
        if factors is not None:
            r = factors[0].shape[-1]
            costs = {k: v + t * r * out_f * in_f for k, v in costs.items()}
            costs["lowrank"] = tokens * t * r * (in_f + out_f)
        return min(costs, key=costs.get)

    def plan(self, image_size: int | None = None, strategy: str | None = None) -> dict[str, str]:
        """Strategy of every weight matrix of the tower for images of ``image_size`` pixels (default: the tower's)."""
        size = image_size or self.visual.image_size[0]
        patches = (size // self.visual.conv1.kernel_size[0]) ** 2
        tokens = {"conv1.weight": patches, "proj": 1}
        return {n: self.choose(n, tokens.get(n, patches + 1), strategy) for n in sorted(self.matrices)}

    # ------------------------------------------------------------ composition
    def composed_params(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ0 + Σ_t λ τ for every composed block.

        Args:
            lam: ``[T, G]`` (shared) or ``[M, T, G]`` (per sample).

        Returns:
            block name -> ``[*shape]`` or ``[M, *shape]``; blocks without a task vector are absent.
        """
        base = dict(self.visual.named_parameters())
        return {name: self._compose_block(name, base[name], self.block_coefficients(lam, name)) for name in self.bank.blocks}

    def _compose_block(self, name: str, base: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``base + Σ_t c_t τ_t`` for ``c [T]`` or ``[M, T]``; fp32 compute, one block converted at a time."""
        c = c.to(torch.float32)
        factors = self.bank.block_factors(name)
        if factors is not None and c.dim() == 1:
            u, v = factors  # shared: U diag(c) V, never the dense [T, out, in]
            t, out, r = u.shape
            scaled = (u.float() * c[:, None, None]).permute(1, 0, 2).reshape(out, t * r)
            return base + (scaled @ v.float().reshape(t * r, -1)).reshape(base.shape)
        delta = self.bank.block_delta(name)
        upd = c @ delta.to(torch.float32).flatten(1)  # [..., numel]
        return base + upd.reshape(*c.shape[:-1], *delta.shape[1:])

    def shared(self, images: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Batch-shared composition: ``images [M,3,H,W]``, ``lam [T,G]`` -> features ``[M,D]``.

        On a dense bank the composed weights go through open_clip's own module. On a low-rank bank a
        weight matrix whose rebuild ``U diag(λ) V`` costs more than applying its factors to this
        batch's tokens (``M·L·(in + out) < out·in``, e.g. ViT-B/32 at batch 4) is applied in
        factored form, as the per-sample path does, instead of being rebuilt dense at every step.
        """
        factored = self._factored_for(images)
        if not factored:
            return self.rebuilt_shared(images, lam)
        base = dict(self.visual.named_parameters())
        params = dict(base)
        for name in self.bank.blocks:
            if name not in factored:
                params[name] = self._compose_block(name, base[name], self.block_coefficients(lam, name))
        dense = _batched_linear(params)

        def linear(name: str, x: torch.Tensor, bias: str | None = None) -> torch.Tensor:
            if name not in factored:
                return dense(name, x, bias)
            vcat, ucat, r = self._lowrank_layout(name)
            c = self.block_coefficients(lam, name).to(torch.float32).expand(x.shape[0], -1)  # [M, T], one row shared
            w0 = _linear_view(name, base[name], 0)
            return _lowrank_linear(x, c, w0, vcat, ucat, r, None if bias is None else params[bias])

        return vit_forward(self.visual, params, images, linear)

    def rebuilt_shared(self, images: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """:meth:`shared` with every weight rebuilt dense, through open_clip's own module (the reference)."""
        return functional_call(self.visual, self.composed_params(lam), (images,), strict=False)

    def _factored_for(self, images: torch.Tensor) -> set[str]:
        """The factored weight matrices that are cheaper to apply as factors than to rebuild for a batch
        of ``images``: ``M·L·T·r·(in + out)`` against ``T·r·out·in`` multiply-adds."""
        patches = (images.shape[-1] // self.visual.conv1.kernel_size[0]) ** 2
        out = set()
        for name in self.matrices & set(self.bank.blocks):
            if self.bank.block_factors(name) is None:
                continue
            tokens = images.shape[0] * {"conv1.weight": patches, "proj": 1}.get(name, patches + 1)
            out_f, in_f = _linear_view(name, self.visual.get_parameter(name), 0).shape
            if tokens * (in_f + out_f) < out_f * in_f:
                out.add(name)
        return out

    def per_sample(self, images: torch.Tensor, lam: torch.Tensor, strategy: str | None = None) -> torch.Tensor:
        """Per-sample composition: ``images [M,3,H,W]``, ``lam [M,T,G]`` -> features ``[M,D]``.

        Args:
            strategy: override the composer's strategy for this call (one of :data:`STRATEGIES`).
        """
        if lam.dim() != 3 or lam.shape[0] != images.shape[0]:
            raise ConfigError(f"per-sample coefficients must be [M, T, G] with M = {images.shape[0]}, got {tuple(lam.shape)}")
        strategy = self._check_strategy(strategy) if strategy else self.strategy
        base = dict(self.visual.named_parameters())
        params = dict(base)
        for name in self.bank.blocks:
            if name not in self.matrices:  # vectors, norms, embeddings: [M, *shape] is cheap
                params[name] = self._compose_block(name, base[name], self.block_coefficients(lam, name))

        def linear(name: str, x: torch.Tensor, bias: str | None = None) -> torch.Tensor:
            w0 = _linear_view(name, base[name], 0)
            how = self.choose(name, x.shape[1], strategy)
            if how == "lowrank":
                vcat, ucat, r = self._lowrank_layout(name)
                c = self.block_coefficients(lam, name).to(torch.float32)  # [M, T]
                if bias is not None and bias in self.group_of_block:  # Σ_t λ_t Δb_t rides in the low-rank product
                    cb = self.block_coefficients(lam, bias).to(torch.float32)
                    return _lowrank_linear(x, c, w0, vcat, ucat, r, base[bias], cb, self.bank.block_delta(bias))
                return _lowrank_linear(x, c, w0, vcat, ucat, r, None if bias is None else base[bias])
            b = None if bias is None else params[bias]  # [out] or per sample [M, out]
            if how == "base":
                return _add_bias(F.linear(x, w0), b) if b is not None and b.dim() > 1 else F.linear(x, w0, b)
            c = self.block_coefficients(lam, name).to(torch.float32)  # [M, T]
            delta = _linear_view(name, self.bank.block_delta(name), 1)
            if how == "linear":
                return _add_bias(_LinearityLinear.apply(x, c, w0, delta, self.chunk_bytes), b)
            # one workspace for every layer, sized by the largest matrix, so it is allocated once
            chunk = min(x.shape[0], max(1, self.chunk_bytes // (4 * self._largest)))
            ws = self.workspace(chunk * self._largest, x.device)
            return _add_bias(_MaterializedLinear.apply(x, c, w0, delta, ws), b)

        return vit_forward(self.visual, params, images, linear)

    def workspace(self, numel: int, device: torch.device) -> torch.Tensor:
        """A flat fp32 buffer of at least ``numel`` elements, kept for later layers and calls."""
        ws = self._workspace
        if ws is None or ws.numel() < numel or ws.device != torch.device(device):
            ws = self._workspace = torch.empty(numel, dtype=torch.float32, device=device)
        return ws

    def _lowrank_layout(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Factors of a block as ``V_cat [T·r, in]`` and ``U_cat [out, T·r]`` (storage dtype, cached)."""
        u, v = self.bank.block_factors(name)
        cached = self._lowrank_cache.get(name)
        if cached is not None and cached[0].device == v.device:
            return cached
        if name == "proj":  # proj is applied as x @ proj: (U V)ᵀ = Vᵀ Uᵀ
            u, v = v.transpose(1, 2), u.transpose(1, 2)
        t, out, r = u.shape
        layout = (v.reshape(t * r, -1).contiguous(), u.permute(1, 0, 2).reshape(out, t * r).contiguous(), r)
        self._lowrank_cache[name] = layout
        return layout

    def naive_per_sample(self, images: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Reference: compose and run each sample alone through open_clip's module (slow; tests only)."""
        return torch.cat([self.rebuilt_shared(images[i : i + 1], lam[i]) for i in range(len(images))])


# ---------------------------------------------------------------- the three per-sample strategies
def _lowrank_linear(x: torch.Tensor, lam: torch.Tensor, w0: torch.Tensor, vcat: torch.Tensor, ucat: torch.Tensor,
                    r: int, b0: torch.Tensor | None = None, lam_b: torch.Tensor | None = None,
                    delta_b: torch.Tensor | None = None) -> torch.Tensor:
    """``x W0ᵀ + b0 + Σ_t λ_t (x V_tᵀ) U_tᵀ + Σ_t λᵇ_t Δb_t`` for all tasks at once.

    Two large products: the base one with its bias fused, then one that adds every task's
    low-rank update (and the bias updates, as ``T`` extra columns) in place.

    Args:
        x: ``[M, L, in]``; lam: ``[M, T]``; w0: ``[out, in]``; vcat: ``[T·r, in]``; ucat: ``[out, T·r]``.
        b0: ``[out]`` base bias or ``None``; lam_b: ``[M, T]`` coefficients of the bias block and
            delta_b: ``[T, out]`` its task vectors (or both ``None``).

    Returns:
        ``[M, L, out]``. Plain autograd: the saved tensors are ``x``, the ``[M, L, T·r]`` projections
        and the small float32 factors.
    """
    m, length, in_f = x.shape
    x2 = x.reshape(m * length, in_f)
    s = (x2 @ vcat.to(x.dtype).t()).view(m, length, -1) * lam.repeat_interleave(r, dim=1)[:, None, :]  # [M, L, T·r]
    u = ucat.to(x.dtype)
    if delta_b is not None:
        s = torch.cat([s, lam_b[:, None, :].expand(m, length, -1)], dim=-1)
        u = torch.cat([u, delta_b.to(x.dtype).t()], dim=1)
    y = x2 @ w0.t() if b0 is None else torch.addmm(b0, x2, w0.t())
    return y.addmm_(s.reshape(m * length, -1), u.t()).view(m, length, -1)


def _steps(m: int, per_sample: int, capacity: int) -> int:
    """Samples per chunk: as many as ``capacity`` elements hold, balanced over the chunks."""
    most = max(1, capacity // max(1, per_sample))
    return math.ceil(m / math.ceil(m / most))


class _MaterializedLinear(torch.autograd.Function):
    """``y_i = x_i W_iᵀ`` with ``W_i = W0 + Σ_t λ_it ΔW_t`` built for a chunk of samples at a time.

    Forward and backward each rebuild the chunk's weights (one matrix product with inner size
    ``T``) in ``workspace``, a buffer the composer keeps across layers and calls (allocating
    fresh pages for every chunk costs more than building the weights), so memory holds one chunk
    of per-sample weights instead of ``M`` of them, and only ``x`` and ``λ`` are saved.
    ``∂L/∂λ_it = ⟨ΔW_t, g_iᵀ x_i⟩``: one ``[out, in]`` outer product per sample (rank ≤ ``L``), then
    one product with the task vectors.

    Inputs: ``x [M, L, in]`` fp32, ``lam [M, T]`` fp32, ``w0 [out, in]`` fp32, ``delta [T, out, in]``
    in its storage dtype (converted per call, one block at a time), ``workspace`` a flat fp32
    buffer of at least ``out·in`` elements.
    """

    @staticmethod
    def forward(ctx, x, lam, w0, delta, workspace):
        out_f, in_f = w0.shape
        d = delta.reshape(delta.shape[0], -1).to(x.dtype)  # [T, out·in]; a view when already fp32
        step = _steps(x.shape[0], out_f * in_f, workspace.numel())
        buf = workspace[: step * out_f * in_f].view(step, out_f * in_f)
        y = x.new_empty(x.shape[0], x.shape[1], out_f)
        flat0 = w0.reshape(1, -1)
        for s in range(0, x.shape[0], step):
            n = min(step, x.shape[0] - s)
            w = torch.addmm(flat0, lam[s : s + n], d, out=buf[:n]).view(n, out_f, in_f)
            torch.bmm(x[s : s + n], w.transpose(1, 2), out=y[s : s + n])
        ctx.save_for_backward(x, lam, w0, delta)
        ctx.workspace, ctx.step = workspace, step
        return y

    @staticmethod
    def backward(ctx, g):
        x, lam, w0, delta = ctx.saved_tensors
        out_f, in_f = w0.shape
        d = delta.reshape(delta.shape[0], -1).to(x.dtype)
        g = g.contiguous()
        need_x, need_lam = ctx.needs_input_grad[:2]
        gx = torch.empty_like(x) if need_x else None
        glam = torch.empty_like(lam) if need_lam else None
        buf = ctx.workspace[: ctx.step * out_f * in_f].view(ctx.step, out_f * in_f)
        flat0 = w0.reshape(1, -1)
        for s in range(0, x.shape[0], ctx.step):
            n = min(ctx.step, x.shape[0] - s)
            gs = g[s : s + n]
            if need_x:
                w = torch.addmm(flat0, lam[s : s + n], d, out=buf[:n]).view(n, out_f, in_f)
                torch.bmm(gs, w, out=gx[s : s + n])
            if need_lam:
                outer = torch.bmm(gs.transpose(1, 2), x[s : s + n], out=buf[:n].view(n, out_f, in_f))
                # [T, out·in] @ [out·in, n]: this orientation runs about twice as fast on CPU as the transpose
                glam[s : s + n] = torch.mm(d, outer.view(n, -1).t()).t()
        return gx, glam, None, None, None


class _LinearityLinear(torch.autograd.Function):
    """``y = x W0ᵀ + Σ_t λ_t (x ΔW_tᵀ)``: all task outputs in one product, weighted per sample.

    Costs ``T`` base products per token, so it pays where tokens per sample are few. Only ``x``
    and ``λ`` are saved; backward recomputes the task outputs for ``∂L/∂λ``.
    Inputs as :class:`_MaterializedLinear`.
    """

    @staticmethod
    def forward(ctx, x, lam, w0, delta, chunk_bytes):
        t, out_f, in_f = delta.shape
        d = delta.reshape(t * out_f, in_f).to(x.dtype)
        m, length, _ = x.shape
        step = _steps(m, length * t * out_f, chunk_bytes // 4)
        y = F.linear(x, w0)
        for s in range(0, m, step):
            z = F.linear(x[s : s + step], d).view(-1, length, t, out_f)
            y[s : s + step] += torch.einsum("mlto,mt->mlo", z, lam[s : s + step])
        ctx.save_for_backward(x, lam, w0, delta)
        ctx.step = step
        return y

    @staticmethod
    def backward(ctx, g):
        x, lam, w0, delta = ctx.saved_tensors
        t, out_f, in_f = delta.shape
        d = delta.reshape(t * out_f, in_f).to(x.dtype)
        m, length, _ = x.shape
        need_x, need_lam = ctx.needs_input_grad[:2]
        gx = g.matmul(w0) if need_x else None
        glam = torch.empty_like(lam) if need_lam else None
        for s in range(0, m, ctx.step):
            gs, ls = g[s : s + ctx.step], lam[s : s + ctx.step]
            if need_x:
                weighted = (gs[:, :, None, :] * ls[:, None, :, None]).reshape(-1, length, t * out_f)
                gx[s : s + ctx.step] += weighted.matmul(d)
            if need_lam:
                z = F.linear(x[s : s + ctx.step], d).view(-1, length, t, out_f)
                glam[s : s + ctx.step] = torch.einsum("mlto,mlo->mt", z, gs)
        return gx, glam, None, None, None


# ---------------------------------------------------------------- functional ViT with batched weights
LinearFn = Callable[..., torch.Tensor]


def _batched_linear(params: Mapping[str, torch.Tensor]) -> LinearFn:
    """``x W_nameᵀ + b`` from ``params`` alone: shared ``[*shape]`` or per-sample ``[M, *shape]`` tensors."""

    def linear(name: str, x: torch.Tensor, bias: str | None = None) -> torch.Tensor:
        w = params[name]
        b = None if bias is None else params[bias]
        if w.dim() < (5 if name == "conv1.weight" else 3):  # shared weight
            if b is None or b.dim() == 1:
                return F.linear(x, _linear_view(name, w, 0), b)
            return _add_bias(F.linear(x, _linear_view(name, w, 0)), b)
        return _add_bias(torch.bmm(x, _linear_view(name, w, 1).transpose(1, 2)), b)

    return linear


def _add_bias(y: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``y [M, L, out]`` plus a ``[out]`` or ``[M, out]`` bias."""
    if b is None:
        return y
    return y + (b if b.dim() == 1 else b[:, None, :])


def _per_token(p: torch.Tensor) -> torch.Tensor:
    """A ``[D]`` or ``[M, D]`` vector broadcast against ``[M, L, D]``."""
    return p if p.dim() == 1 else p[:, None, :]


def _layer_norm(x: torch.Tensor, ln: torch.nn.Module, prefix: str, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(ln, torch.nn.Identity):
        return x
    y = F.layer_norm(x, x.shape[-1:], eps=ln.eps)
    return y * _per_token(params[prefix + "weight"]) + _per_token(params[prefix + "bias"])


def _attention(x: torch.Tensor, attn: torch.nn.MultiheadAttention, prefix: str, params, linear: LinearFn) -> torch.Tensor:
    m, length, width = x.shape
    heads = attn.num_heads
    qkv = linear(prefix + "in_proj_weight", x, prefix + "in_proj_bias")
    q, k, v = (t.reshape(m, length, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(m, length, width)
    return linear(prefix + "out_proj.weight", out, prefix + "out_proj.bias")


def _layer_scale(x: torch.Tensor, ls: torch.nn.Module, prefix: str, params) -> torch.Tensor:
    return x if isinstance(ls, torch.nn.Identity) else x * _per_token(params[prefix + "gamma"])


def vit_forward(visual: torch.nn.Module, params: Mapping[str, torch.Tensor], images: torch.Tensor,
                linear: LinearFn | None = None) -> torch.Tensor:
    """open_clip ``VisionTransformer.forward`` (eval, no patch dropout) with optionally per-sample params.

    Args:
        visual: the module, read only for its structure (heads, eps, activation, pooling).
        params: ``visual``-relative name -> tensor, either the shared shape or ``[M, *shape]``.
        images: ``[M, 3, H, W]``.
        linear: ``linear(name, x [M, L, in], bias_name=None) -> [M, L, out]`` applies weight
            matrix ``name`` and bias ``bias_name``; default: both from ``params``, shared or per sample.

    Returns:
        image features ``[M, D]`` (before L2 normalisation).
    """
    linear = linear or _batched_linear(params)
    m = images.shape[0]
    p = visual.conv1.kernel_size
    patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # [M, L, 3*p*p]
    x = linear("conv1.weight", patches)  # [M, L, W]
    cls = params["class_embedding"]
    cls = cls.expand(m, -1) if cls.dim() == 1 else cls
    x = torch.cat([cls[:, None, :].to(x.dtype), x], dim=1)
    pos = params["positional_embedding"]
    x = x + pos.to(x.dtype)  # [L+1, W] or [M, L+1, W] both broadcast
    x = _layer_norm(x, visual.ln_pre, "ln_pre.", params)
    for i, blk in enumerate(visual.transformer.resblocks):
        pre = f"transformer.resblocks.{i}."
        h = _attention(_layer_norm(x, blk.ln_1, pre + "ln_1.", params), blk.attn, pre + "attn.", params, linear)
        x = x + _layer_scale(h, blk.ls_1, pre + "ls_1.", params)
        h = linear(pre + "mlp.c_fc.weight", _layer_norm(x, blk.ln_2, pre + "ln_2.", params), pre + "mlp.c_fc.bias")
        h = linear(pre + "mlp.c_proj.weight", blk.mlp.gelu(h), pre + "mlp.c_proj.bias")
        x = x + _layer_scale(h, blk.ls_2, pre + "ls_2.", params)
    if visual.final_ln_after_pool:
        pooled, _ = visual._global_pool(x)
        pooled = _layer_norm(pooled[:, None, :], visual.ln_post, "ln_post.", params)[:, 0]
    else:
        pooled, _ = visual._global_pool(_layer_norm(x, visual.ln_post, "ln_post.", params))
    if params.get("proj") is None:
        return pooled
    return linear("proj", pooled[:, None, :])[:, 0]
