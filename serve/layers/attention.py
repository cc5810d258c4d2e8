"""Attention over one step's flat tokens: packed prefill + paged continuation/decode.

A step's flat tokens are laid out as
  [0, P)   fresh prompts (no cached context), packed row by row (see engine/packing.py)
  [P, T)   requests with cached context: chunked-prefill continuations and decodes
Every token's K/V is written into its KV-cache slot first. Fresh prompts attend
within their own prompt only (block-diagonal causal) through the selected
backend; the rest attend over their cached K/V (paged path).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from packserve.kernels import cpu_ops
from packserve.kernels.paged_attention import paged_decode_attention_triton

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


# A paged group's additive mask is built once per step when it has at most this many elements (256 MiB in fp32);
# a bigger one (a long prompt's later chunks: 8192 queries x 32k keys would be 1 GiB in fp32) is built per layer
# in query-row slices of about this size instead, which costs time (a 12k-token prompt in 4096-token chunks
# prefilled in 6.1 s instead of 4.8 s on the 2-core CPU with 16M-element slices) but bounds the memory.
MASK_MAX_ELEMENTS = 1 << 26


def paged_mask(ctx: torch.Tensor, q_lens: torch.Tensor, rows: range, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, len(rows), width] for query rows `rows` of a paged group: query i of request b (at
    position ctx[b] + i) sees cache positions <= ctx[b] + i; padding rows (i >= q_lens[b]) see slot 0 only, so
    no row is all -inf (no NaN). ctx, q_lens: long [B] on the mask's device."""
    B = ctx.shape[0]
    qi = torch.arange(rows.start, rows.stop, device=ctx.device).view(1, -1, 1)
    kj = torch.arange(width, device=ctx.device).view(1, 1, width)
    valid_q = qi < q_lens.view(B, 1, 1)
    mask = (kj <= ctx.view(B, 1, 1) + qi) & valid_q
    mask |= (~valid_q) & (kj == 0)
    return torch.zeros(mask.shape, dtype=dtype, device=ctx.device).masked_fill_(~mask, float("-inf")).unsqueeze(1)


@dataclass
class PagedGroup:
    """Requests attended together, padded to the group's longest context."""

    token_index: torch.Tensor | None  # long: positions of the group's query tokens in the paged segment
    q_index: torch.Tensor  # long [Tq_group]: token -> b * max_q + i
    block_table: torch.Tensor  # long [B, nb]: KV blocks of each request (padded with block 0)
    # additive (0 / -inf) [B, 1, max_q, nb * block_size] in the KV cache's dtype; None when it would exceed
    # MASK_MAX_ELEMENTS: then ctx_lens/q_lens (long [B]) give it, built per slice of query rows
    mask: torch.Tensor | None
    batch: int
    max_q: int
    ctx_lens: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None
    block_size: int = 0  # 0: derived from the mask's width


@dataclass
class PagedMeta:
    num_tokens: int
    groups: list[PagedGroup]
    # Set instead of groups when every request decodes one token and a decode kernel runs the step (the C kernel
    # in packserve.kernels.cpu_ops on CPU, the Triton one in packserve.kernels.paged_attention on CUDA):
    # int64 [B, max_blocks], int64 [B] context lengths, and their maximum known on the host.
    block_table: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    block_size: int = 0
    max_seq_len: int = 0
    kernel: str = "cpu"  # "cpu" or "triton" (the runner's choice; Triton also runs on CPU in the interpreter)


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
        from torch.nn.attention.flex_attention import flex_attention

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

    On CUDA: torch's flash `varlen_attn`. On CPU, where torch has no varlen kernel, one causal SDPA call per
    prompt over its slice of the flat tokens (the CPU flash kernel skips the blocks above the diagonal): it does
    the sum of L^2/2 score work of the prompts instead of the rows x capacity^2 of the dense-mask rows."""

    name = "varlen"

    def __init__(self, device: torch.device):
        self.on_cpu = device.type != "cuda"
        if self.on_cpu:
            return
        from torch.nn.attention.varlen import varlen_attn

        self.fn = varlen_attn
        params = inspect.signature(varlen_attn).parameters
        # The causal flag changed across torch versions (DESIGN.md §9).
        if "is_causal" in params:
            self.causal = {"is_causal": True}
        elif "window_size" in params:
            self.causal = {"window_size": (-1, 0)}
        else:
            raise RuntimeError("varlen_attn has neither is_causal nor window_size")
        self.has_gqa = "enable_gqa" in params
        self.has_scale = "scale" in params

    def packed(self, q, k, v, meta, scale):
        if self.on_cpu:
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
        out = q.new_empty(q.shape[1], q.shape[0], v.shape[-1])
        start = 0
        for n in meta.seq_lens:
            end = start + n
            out[:, start:end] = F.scaled_dot_product_attention(
                qt[None, :, start:end], kt[None, :, start:end], vt[None, :, start:end], is_causal=True,
                scale=scale, enable_gqa=gqa)[0]
            start = end
        return out.transpose(0, 1)


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


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """Pick an attention backend; 'auto' is varlen (falling back to sdpa where torch has no varlen_attn)."""
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


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMeta,
                    scale: float) -> torch.Tensor:
    """Queries with cached context: per group, gather each request's K/V by slot, then masked SDPA
    (or, for an all-decode step, a paged decode kernel reading the blocks in place)."""
    if meta.block_table is not None and meta.kernel == "triton":
        return paged_decode_attention_triton(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.block_size,
                                             scale, meta.max_seq_len)
    if meta.block_table is not None:
        return cpu_ops.paged_decode_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.block_size,
                                              scale, check_values=False)
    if len(meta.groups) == 1 and meta.groups[0].token_index is None:
        return _attend_group(q, k_cache, v_cache, meta.groups[0], scale)
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    for g in meta.groups:
        out.index_copy_(0, g.token_index, _attend_group(q.index_select(0, g.token_index), k_cache, v_cache, g, scale))
    return out


def _attend_group(q, k_cache, v_cache, g: PagedGroup, scale: float) -> torch.Tensor:
    B, Q = g.batch, g.max_q
    H, D = q.shape[1], q.shape[2]
    if Q == 1:  # pure decode: one query per request, already in order
        qb = q.view(B, 1, H, D).transpose(1, 2)
    else:
        qb = q.new_zeros(B * Q, H, D)
        qb.index_copy_(0, g.q_index, q)
        qb = qb.view(B, Q, H, D).transpose(1, 2)
    # Gather whole blocks (one contiguous block_size x Hkv x D chunk each), not token slots: far fewer,
    # larger copies. index_select beats advanced indexing with a 2-D index on CPU.
    blocks = g.block_table.view(-1)
    bs = g.block_size or g.mask.shape[-1] // g.block_table.shape[1]
    kb = k_cache.view(-1, bs * k_cache.shape[1] * k_cache.shape[2]).index_select(0, blocks)
    vb = v_cache.view(-1, bs * v_cache.shape[1] * v_cache.shape[2]).index_select(0, blocks)
    kb = kb.view(B, -1, *k_cache.shape[1:]).transpose(1, 2)  # [B, Hkv, nb * bs, D]
    vb = vb.view(B, -1, *v_cache.shape[1:]).transpose(1, 2)
    gqa = kb.shape[1] != H
    if g.mask is not None:
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=g.mask, scale=scale, enable_gqa=gqa)
    else:  # a mask too big to hold whole: slices of query rows, each with its own slice of the mask
        L = kb.shape[2]
        step = max(1, MASK_MAX_ELEMENTS // (B * L))
        out = torch.cat([F.scaled_dot_product_attention(
            qb[:, :, r0:r0 + step], kb, vb, attn_mask=paged_mask(g.ctx_lens, g.q_lens, range(r0, min(Q, r0 + step)), L,
                                                                  kb.dtype), scale=scale, enable_gqa=gqa)
            for r0 in range(0, Q, step)], dim=2)
    out = out.transpose(1, 2).reshape(B * Q, H, vb.shape[-1])
    return out if Q == 1 else out.index_select(0, g.q_index)


class Attention(torch.nn.Module):
    """Writes K/V into the cache and attends; q/k/v: [T, heads, head_dim] for the step's flat tokens."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.layer_idx = scale, layer_idx

    def forward(self, q, k, v, ctx: "ForwardContext") -> torch.Tensor:
        meta = ctx.attn
        k_cache, v_cache = ctx.kv_cache.layer(self.layer_idx)
        if cpu_ops.usable(k, v, k_cache):
            cpu_ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
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
