"""Attention of queries with cached context over the paged KV cache: chunked-prefill continuations and decodes.

All-decode steps read the blocks in place with a decode kernel (the C kernel in packserve.kernels.cpu_ops on CPU,
the Triton one in packserve.kernels.paged_attention on CUDA). Other steps gather each request's blocks, grouped by
context length, and run SDPA with an additive mask (built once per step, or per slice of query rows when too big).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from packserve.kernels import cpu_ops
from packserve.kernels.paged_attention import paged_decode_attention_triton

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
    block_size: int
    ctx_lens: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None


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


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedMeta,
                    scale: float) -> torch.Tensor:
    """Queries with cached context: per group, gather each request's K/V by slot, then masked SDPA
    (or, for an all-decode step, a paged decode kernel reading the blocks in place)."""
    if meta.block_table is not None and meta.kernel == "triton":
        return paged_decode_attention_triton(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.block_size,
                                             scale, meta.max_seq_len)
    if meta.block_table is not None:
        return cpu_ops.paged_decode_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.block_size,
                                              scale)
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
    bs = g.block_size
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
