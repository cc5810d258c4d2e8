"""Attention over one step's flat tokens: packed prefill + paged continuation/decode.

A step's flat tokens are laid out as
  [0, P)   fresh prompts (no cached context), packed row by row (see engine/packing.py)
  [P, T)   requests with cached context: chunked-prefill continuations and decodes
Every token's K/V is written into its KV-cache slot first. Fresh prompts attend
within their own prompt only (block-diagonal causal) through the selected
backend; the rest attend over their cached K/V (paged path, packserve.layers.paged_attention_layer).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from packserve.kernels import cpu_ops
from packserve.layers.paged_attention_layer import PagedMeta, paged_attention

log = logging.getLogger(__name__)


@dataclass
class PackedMeta:
    num_tokens: int
    cu_seqlens: torch.Tensor  # int32 [N + 1] on device
    max_seqlen: int
    seq_lens: list[int]  # host copy, flat order
    # Row layout (sdpa rows): token -> row * capacity + column.
    num_rows: int = 0
    capacity: int = 0
    row_index: torch.Tensor | None = None
    segments: torch.Tensor | None = None  # long [R, C]: prompt index within the row; pads unique negatives
    mask: torch.Tensor | None = None  # additive [R, 1, C, C] (backends with dense_mask)
    extra: Any = None  # backend-specific (flex BlockMask, xformers bias)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # long [T]
    packed: PackedMeta | None
    paged: PagedMeta | None


def row_layout(row_cu_tokens: list[int], segment_ids: list[int], capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows as tensors: (row_index [T]: flat token -> row * C + column, segments [R, C]).
    Padding slots get a unique negative segment each, so a pad attends only to itself (never all-masked: no NaN)."""
    R, C = len(row_cu_tokens) - 1, capacity
    starts = torch.tensor(row_cu_tokens, dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(R), starts.diff())
    col = torch.arange(int(starts[-1])) - starts[row]
    seg = (-1 - torch.arange(C)).repeat(R, 1)
    seg[row, col] = torch.tensor(segment_ids, dtype=torch.long)
    return row * C + col, seg


def segment_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    """bool [R, C, C]: token q may attend token k iff same segment (prompt) and k <= q."""
    pos = torch.arange(seg.shape[-1])
    return (seg[:, :, None] == seg[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])


def block_diagonal_causal_mask(seq_lens: list[int], capacity: int | None = None) -> torch.Tensor:
    """bool [C, C] of one packed row holding prompts of `seq_lens` (the mask the sdpa backend uses)."""
    n = sum(seq_lens)
    segments = [i for i, length in enumerate(seq_lens) for _ in range(length)]
    _, seg = row_layout([0, n], segments, n if capacity is None else capacity)
    return segment_causal_mask(seg)[0]


class AttentionBackend:
    name = "base"
    uses_rows = False  # wants the packed rows layout (row_index, segments)
    dense_mask = False  # wants the additive [R, 1, C, C] mask too

    def prepare(self, meta: PackedMeta, device: torch.device) -> None:
        """Build per-step structures shared by all layers."""

    def packed(self, q, k, v, meta: PackedMeta, scale: float) -> torch.Tensor:
        raise NotImplementedError


class SdpaBackend(AttentionBackend):
    """Dense block-diagonal causal mask per packed row (the Prepacking paper's method)."""

    name = "sdpa"
    uses_rows = True
    dense_mask = True

    def packed(self, q, k, v, meta, scale):
        out = F.scaled_dot_product_attention(to_rows(q, meta), to_rows(k, meta), to_rows(v, meta),
                                             attn_mask=meta.mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return from_rows(out, meta)


def to_rows(x: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
    """Flat [T, H, D] -> zero-padded rows [R, H, C, D]."""
    R, C = meta.num_rows, meta.capacity
    buf = x.new_zeros(R * C, x.shape[1], x.shape[2])
    buf.index_copy_(0, meta.row_index, x)
    return buf.view(R, C, x.shape[1], x.shape[2]).transpose(1, 2)


def from_rows(out: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
    """Rows [R, H, C, D] -> the real tokens, flat [T, H, D]."""
    R, H, C, D = out.shape
    return out.transpose(1, 2).reshape(R * C, H, D).index_select(0, meta.row_index)


class FlexBackend(AttentionBackend):
    """FlexAttention with a document mask (block-sparse: skips cross-prompt blocks).

    On CUDA it runs over the flat tokens (one sequence, no padding). Eager FlexAttention on CPU materializes
    the whole score matrix (T^2: 5 GB for 8k tokens), so there it runs over the packed rows (R x C^2)."""

    name = "flex"

    def __init__(self, device: torch.device):
        self.uses_rows = device.type != "cuda"
        self._flex = None

    def _kernel(self):
        """flex_attention, compiled on CUDA (eager FlexAttention materializes the T x T scores there; compiled,
        dynamic shapes, it is the fused block-sparse kernel), eager on CPU (compiling costs ~10 s per shape)."""
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            self._flex = torch.compile(flex_attention, dynamic=True) if not self.uses_rows else flex_attention
        return self._flex

    def prepare(self, meta, device):
        from torch.nn.attention.flex_attention import create_block_mask

        if self.uses_rows:
            seg = meta.segments

            def row_document_causal(b, h, q_idx, kv_idx):
                return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

            meta.extra = create_block_mask(row_document_causal, meta.num_rows, None, meta.capacity, meta.capacity,
                                           device=device)
            return
        doc = torch.repeat_interleave(torch.arange(len(meta.seq_lens), device=device),
                                      torch.tensor(meta.seq_lens, device=device))

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        meta.extra = create_block_mask(document_causal, None, None, meta.num_tokens, meta.num_tokens, device=device)

    def packed(self, q, k, v, meta, scale):
        flex_attention = self._kernel()
        gqa = k.shape[1] != q.shape[1]
        if self.uses_rows:
            out = flex_attention(to_rows(q, meta), to_rows(k, meta), to_rows(v, meta), block_mask=meta.extra,
                                 scale=scale, enable_gqa=gqa)
            return from_rows(out, meta)
        out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                             block_mask=meta.extra, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)


class VarlenBackend(AttentionBackend):
    """Flat tokens + cu_seqlens: no rows, no mask, no padding anywhere.

    On CUDA: torch's flash `varlen_attn`. On CPU, where torch has no varlen kernel: packserve's CPU operator
    (packserve.kernels.cpu_ops.varlen_attention: every prompt in one call, key tiles of 32 below the diagonal only,
    on oneDNN's brgemm), or without it one causal SDPA call per prompt over its slice of the flat tokens. Both do
    about the sum of L^2/2 score work of the prompts instead of the rows x capacity^2 of the dense-mask rows
    (torch's CPU flash kernel, in 512-key blocks, computes and masks the whole square of a shorter prompt)."""

    name = "varlen"

    def __init__(self, device: torch.device):
        self.on_cpu = device.type != "cuda"
        if self.on_cpu:
            return
        from torch.nn.attention.varlen import varlen_attn

        self.fn = varlen_attn
        params = inspect.signature(varlen_attn).parameters
        # The causal flag differs across torch versions (is_causal=True in some, window_size=(-1, 0) in others).
        if "is_causal" in params:
            self.causal = {"is_causal": True}
        elif "window_size" in params:
            self.causal = {"window_size": (-1, 0)}
        else:
            raise RuntimeError("varlen_attn has neither is_causal nor window_size")
        self.has_gqa = "enable_gqa" in params
        self.has_scale = "scale" in params

    def prepare(self, meta, device):
        if self.on_cpu:  # the CPU operator takes int64 offsets: converted once per step, not per layer
            meta.extra = meta.cu_seqlens.to(torch.int64)

    def packed(self, q, k, v, meta, scale):
        if self.on_cpu:
            if meta.extra is not None and cpu_ops.usable(q) and cpu_ops.has_varlen():
                return cpu_ops.varlen_attention(q, k, v, meta.extra, scale)
            return self._per_sequence(q, k, v, meta, scale)
        kw = dict(self.causal)
        if k.shape[1] != q.shape[1]:
            if self.has_gqa:
                kw["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.has_scale:
            kw["scale"] = scale
        else:
            q = q * (scale * q.shape[-1] ** 0.5)
        cu = meta.cu_seqlens
        # Flash kernels want dense [T, H, D]; q/k/v arrive as column slices of the fused QKV output.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return self.fn(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, **kw)

    @staticmethod
    def _per_sequence(q, k, v, meta, scale):
        gqa = k.shape[1] != q.shape[1]
        qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D] views
        # [T, H, D] like the input: torch's CPU flash kernel returns a [1, H, L, D] view of a token-major buffer,
        # so each prompt's result copies in as one contiguous block and the output projection reads it as it is
        # (an [H, T, D] buffer cost a strided copy per prompt plus a transposing copy of the whole step).
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        start = 0
        for n in meta.seq_lens:
            end = start + n
            out[start:end] = F.scaled_dot_product_attention(
                qt[None, :, start:end], kt[None, :, start:end], vt[None, :, start:end], is_causal=True,
                scale=scale, enable_gqa=gqa)[0].transpose(0, 1)
            start = end
        return out


class XformersBackend(AttentionBackend):
    """xformers memory_efficient_attention with BlockDiagonalCausalMask (CUDA, matching torch build)."""

    name = "xformers"

    def __init__(self):
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

        self.xops, self.mask_cls = xops, BlockDiagonalCausalMask

    def prepare(self, meta, device):
        meta.extra = self.mask_cls.from_seqlens(meta.seq_lens)

    def packed(self, q, k, v, meta, scale):
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = self.xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=meta.extra, scale=scale)
        return out[0]


def _xformers_usable(device: torch.device) -> str | None:
    """None if xformers' kernels run here, else the reason."""
    if device.type != "cuda":
        return "xformers kernels need CUDA"
    try:
        import xformers.ops as xops

        q = torch.randn(1, 8, 1, 16, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        return None
    except Exception as exc:  # ImportError, or kernels built for another torch
        return f"xformers unusable with torch {torch.__version__}: {type(exc).__name__}: {str(exc)[:200]}"


def select_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """Pick an attention backend. 'auto': varlen on CPU (packserve's C operator) and for fp16/bf16 on CUDA
    (flash kernels); sdpa for fp32 on CUDA, which the flash kernels do not take (and wherever torch has no
    varlen_attn)."""
    if device.type == "cuda" and dtype == torch.float32 and name in ("auto", "varlen"):
        log.info("fp32 on CUDA: the packed prefill runs on the sdpa backend (flash varlen kernels take fp16/bf16)")
        return SdpaBackend()
    if name == "auto":
        try:
            return VarlenBackend(device)
        except Exception as exc:  # older torch without varlen_attn
            log.warning("varlen attention unavailable (%s); using sdpa", exc)
            return SdpaBackend()
    if name == "sdpa":
        return SdpaBackend()
    if name == "flex":
        return FlexBackend(device)
    if name == "varlen":
        return VarlenBackend(device)
    if name == "xformers":
        reason = _xformers_usable(device)
        if reason is not None:
            log.warning("backend 'xformers' requested but %s; falling back to sdpa", reason)
            return SdpaBackend()
        return XformersBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose from auto, sdpa, flex, varlen, xformers")


class Attention(torch.nn.Module):
    """Writes K/V into the cache and attends; q/k/v: [T, heads, head_dim] for the step's flat tokens."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.layer_idx = scale, layer_idx

    def forward(self, q, k, v, ctx: "ForwardContext") -> torch.Tensor:
        meta = ctx.attn
        k_cache, v_cache = ctx.kv_cache.layer(self.layer_idx)
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        parts = []
        P = meta.packed.num_tokens if meta.packed is not None else 0
        if meta.packed is not None:
            parts.append(ctx.backend.packed(q[:P], k[:P], v[:P], meta.packed, self.scale))
        if meta.paged is not None:
            parts.append(paged_attention(q[P:], k_cache, v_cache, meta.paged, self.scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    kv_cache: Any
    backend: AttentionBackend
    linear: Any = None  # LinearAttnMeta for models with linear-attention layers
    state_cache: Any = None
    # The flat rows the caller reads from the model's output (the sampled ones), in the order it wants them; None:
    # every row. The last layer still writes every token's K/V (or state), then projects, adds and normalizes
    # only these rows: a prefill step samples one row per prompt, so its last MLP shrinks from T rows to a few.
    output_rows: torch.Tensor | None = None


def select_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x's rows `rows` (all of x for None)."""
    return x if rows is None else x.index_select(0, rows)
