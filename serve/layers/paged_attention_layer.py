"""Attention of new tokens with cached context, through the block table: decodes, chunked-prefill continuations
and prompts behind a prefix-cache hit, all in one call per layer with metadata built once per step.

`build_paged_meta` (the runner calls it once per step) reads the rows of the persistent input batch
(packserve.engine.input_batch): each request's block-table row, cached and new token counts.
Then per layer:
- CUDA (and the Triton interpreter in tests): one call of the unified paged kernel,
  packserve.kernels.paged_attention_triton, for every new token of the step whatever its request's query length.
- CPU: the requests with one new token (decodes) go through the C decode kernel (packserve.kernels.cpu_ops) in
  one call, and those with several new tokens through the C prefill operator in one more (paged_prefill_attention:
  keys read through the block table, causal from each request's cached length). Without the C kernels, the
  decodes are gathered together and masked to each request's length, and each multi-token request attends over
  its own blocks with SDPA (in slices of query rows when its mask would be large).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from packserve.kernels import cpu_ops
from packserve.kernels.paged_attention_triton import DECODE_TILES, PagedTiles, block_q_for, query_tiles

if TYPE_CHECKING:
    from packserve.engine.input_batch import BatchView

# A request's causal mask is built whole when it has at most this many elements; a longer one (a long prompt's
# later chunks: 8192 queries x 32k keys would be 256M) is built and attended in slices of query rows of about
# this size, each over only the keys its rows can see.
MASK_MAX_ELEMENTS = 1 << 26


@dataclass
class Span:
    """A request with several new tokens (CPU paths): its rows in the step's paged segment, its cached length and
    the blocks holding its context."""

    start: int
    num_new: int
    ctx_len: int
    blocks: torch.Tensor  # long [ceil((ctx_len + num_new) / block_size)]


@dataclass
class PagedMeta:
    num_tokens: int  # new tokens with cached context in this step (the rows of q)
    block_table: torch.Tensor  # int64 [B, max_blocks] KV blocks of each request (the batch's rows)
    seq_lens: torch.Tensor  # [B] cached + new tokens
    q_lens_host: list[int]
    block_size: int
    max_seq_len: int
    kernel: str  # "triton", "cpu" (C decode kernel) or "torch"
    # triton: int32 [B] cached lengths, new-token counts and first rows; query tiles made on the first layer
    ctx_lens: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None
    q_start: torch.Tensor | None = None
    tiles: PagedTiles | None = None
    # cpu / torch: the one-token requests (rows in the segment, None when every request decodes; their table
    # and lengths) and the multi-token ones
    decode_rows: torch.Tensor | None = None
    decode_table: torch.Tensor | None = None
    decode_seq_lens: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None  # torch: additive [Bd, 1, 1, nb * block_size]
    spans: list[Span] = field(default_factory=list)
    # cpu with the C prefill operator: the multi-token requests' table rows, lengths, first rows and counts (int64
    # [S]), and their rows in the segment (None when they are all of it, in order)
    span_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    span_rows: torch.Tensor | None = None


def build_paged_meta(view: BatchView, block_size: int, kernel: str, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> PagedMeta:
    """The step's paged metadata from the persistent batch's rows (packserve.engine.input_batch)."""
    n = view.num_rows
    q_host = view.q_host.tolist()
    max_kv = int((view.ctx_host + view.q_host).max())
    meta = PagedMeta(int(view.q_host.sum()), view.table, view.seq_lens, q_host, block_size, max_kv, kernel)
    if kernel == "triton":
        meta.ctx_lens, meta.q_lens, meta.q_start = view.ctx_lens, view.q_lens, view.q_start
        return meta
    one = [b for b in range(n) if q_host[b] == 1]
    starts = (np.cumsum(view.q_host) - view.q_host).tolist()
    ctx_host = view.ctx_host.tolist()
    multi = [b for b in range(n) if q_host[b] > 1]
    if multi and kernel == "cpu" and cpu_ops.has_varlen():  # every span in one call of the C operator
        idx = torch.tensor(multi, dtype=torch.long, device=device)
        table = view.table if len(multi) == n else view.table.index_select(0, idx)
        lens = view.seq_lens if len(multi) == n else view.seq_lens.index_select(0, idx)
        span_starts = [starts[b] for b in multi]
        meta.span_args = (table, lens, torch.tensor(span_starts, dtype=torch.long, device=device),
                          torch.tensor([q_host[b] for b in multi], dtype=torch.long, device=device))
        if len(multi) < n:
            meta.span_rows = torch.cat([torch.arange(a, a + q_host[b], device=device)
                                        for a, b in zip(span_starts, multi)])
    else:
        meta.spans = [Span(starts[b], q_host[b], ctx_host[b],
                           view.table[b, :-(-(ctx_host[b] + q_host[b]) // block_size)]) for b in multi]
    if one:
        all_decode = len(one) == n
        idx = None if all_decode else torch.tensor(one, dtype=torch.long, device=device)
        meta.decode_rows = None if all_decode else torch.tensor([starts[b] for b in one], dtype=torch.long,
                                                                 device=device)
        meta.decode_table = view.table if all_decode else view.table.index_select(0, idx)
        meta.decode_seq_lens = view.seq_lens if all_decode else view.seq_lens.index_select(0, idx)
        if kernel == "torch":  # gathered blocks: each row sees its request's cached positions only
            nb = -(-max(ctx_host[b] + 1 for b in one) // block_size)
            meta.decode_table = meta.decode_table[:, :nb].contiguous()
            width = nb * block_size
            mask = torch.arange(width, device=device).view(1, -1) < meta.decode_seq_lens.view(-1, 1)
            meta.decode_mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(
                ~mask, float("-inf")).view(len(one), 1, 1, width)
    return meta


def static_decode_meta(table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, kernel: str,
                       max_seq_len: int) -> PagedMeta:
    """Metadata of a decode step read from fixed device buffers, with nothing taken from the host: what a CUDA
    graph of the decode forward captures (packserve.engine.cuda_graphs). `max_seq_len` bounds every request's
    context (the model's context length), so the Triton kernel's split count is fixed for the batch size."""
    rows = table.shape[0]
    meta = PagedMeta(rows, table, seq_lens, [1] * rows, block_size, max_seq_len, kernel)
    if kernel == "triton":
        meta.tiles = DECODE_TILES
    elif kernel == "cpu":
        meta.decode_table, meta.decode_seq_lens = table, seq_lens
    else:
        raise ValueError(f"no static decode with the {kernel!r} paged kernel")
    return meta


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMeta,
                    scale: float) -> torch.Tensor:
    """q: [num_tokens, H, D], the step's new tokens with cached context (their own K/V already in the cache)."""
    if meta.kernel == "triton":
        if meta.tiles is None:  # made once per step (the first layer), from host lists
            max_q = max(meta.q_lens_host)
            meta.tiles = DECODE_TILES if max_q == 1 else query_tiles(
                meta.q_lens_host, block_q_for(max_q, q.shape[1] // k_cache.shape[1]), q.device)
        ops = torch.ops.packserve_triton  # the kernels as torch operators (packserve.kernels.triton_ops)
        if meta.tiles is DECODE_TILES:  # every request decodes: the decode launch (its splits fit decode steps)
            return ops.paged_decode_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.block_size,
                                              scale, meta.max_seq_len)
        t = meta.tiles
        return ops.paged_attention(q, k_cache, v_cache, meta.block_table, meta.ctx_lens, meta.q_lens, meta.q_start,
                                   t.tile_seq, t.tile_q0, t.block_q, meta.block_size, scale, meta.max_seq_len)
    if meta.span_args is not None:
        spans = cpu_ops.paged_prefill_attention(q, k_cache, v_cache, *meta.span_args, meta.block_size, scale)
        if meta.span_rows is None:  # every request of the segment has several new tokens: the rows in order
            return spans
        out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
        out.index_copy_(0, meta.span_rows, spans)
        out.index_copy_(0, meta.decode_rows, _decode(q.index_select(0, meta.decode_rows), k_cache, v_cache, meta,
                                                     scale))
        return out
    if not meta.spans:
        return _decode(q, k_cache, v_cache, meta, scale)
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    if meta.decode_table is not None:
        out.index_copy_(0, meta.decode_rows, _decode(q.index_select(0, meta.decode_rows), k_cache, v_cache, meta,
                                                     scale))
    for s in meta.spans:
        out[s.start:s.start + s.num_new] = span_attention(q[s.start:s.start + s.num_new], k_cache, v_cache, s,
                                                          meta.block_size, scale)
    return out


def _decode(q, k_cache, v_cache, meta: PagedMeta, scale: float) -> torch.Tensor:
    if meta.kernel == "cpu":
        return cpu_ops.paged_decode_attention(q, k_cache, v_cache, meta.decode_table, meta.decode_seq_lens,
                                              meta.block_size, scale)
    # torch: gather whole blocks (one contiguous block_size x Hkv x D chunk each: far fewer, larger copies than
    # token slots; index_select beats advanced indexing with a 2-D index on CPU), masked to each length.
    B, H, D = q.shape
    bs, table = meta.block_size, meta.decode_table
    kb = k_cache.view(-1, bs * k_cache.shape[1] * k_cache.shape[2]).index_select(0, table.view(-1))
    vb = v_cache.view(-1, bs * v_cache.shape[1] * v_cache.shape[2]).index_select(0, table.view(-1))
    kb = kb.view(B, -1, *k_cache.shape[1:]).transpose(1, 2)  # [B, Hkv, nb * bs, D]
    vb = vb.view(B, -1, *v_cache.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.view(B, 1, H, D).transpose(1, 2), kb, vb, attn_mask=meta.decode_mask,
                                         scale=scale, enable_gqa=kb.shape[1] != H)
    return out.transpose(1, 2).reshape(B, H, vb.shape[-1])


def span_mask(ctx_len: int, rows: range, width: int, device: torch.device) -> torch.Tensor:
    """bool [len(rows), width]: new token i (at position ctx_len + i) sees positions <= its own."""
    return torch.arange(width, device=device).view(1, -1) <= (ctx_len + torch.arange(rows.start, rows.stop,
                                                                                      device=device)).view(-1, 1)


def span_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, s: Span, block_size: int,
                   scale: float) -> torch.Tensor:
    """One request's new tokens over its own blocks: SDPA, causal from its cached length."""
    L = s.ctx_len + s.num_new
    bs = block_size
    kb = k_cache.view(-1, bs, *k_cache.shape[1:]).index_select(0, s.blocks).flatten(0, 1)[:L].transpose(0, 1)
    vb = v_cache.view(-1, bs, *v_cache.shape[1:]).index_select(0, s.blocks).flatten(0, 1)[:L].transpose(0, 1)
    qh = q.transpose(0, 1)  # [H, n, D]
    gqa = kb.shape[0] != qh.shape[0]
    step = max(1, MASK_MAX_ELEMENTS // L)
    outs = []
    for r0 in range(0, s.num_new, step):
        r1 = min(s.num_new, r0 + step)
        seen = s.ctx_len + r1  # keys any row of the slice can see
        mask = span_mask(s.ctx_len, range(r0, r1), seen, q.device)
        outs.append(F.scaled_dot_product_attention(qh[:, r0:r1], kb[:, :seen], vb[:, :seen], attn_mask=mask,
                                                   scale=scale, enable_gqa=gqa))
    return torch.cat(outs, dim=1).transpose(0, 1) if len(outs) > 1 else outs[0].transpose(0, 1)
