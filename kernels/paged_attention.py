"""Paged decode attention for GPUs: a Triton kernel reading the KV blocks in place, its wrapper and references.

A decode step has one query token per request; its context sits in the paged KV cache ([slots, Hkv, D] per
layer, slot = block * block_size + offset, the request's blocks listed in its block-table row). The torch path
gathers every request's blocks into a padded copy and runs SDPA on it, which writes and reads the whole context
again in every layer. This kernel streams each request's K/V rows once, flash-decoding style:

  1. `_decode_kernel`, one program per (request, KV head, split): the G = H / Hkv query heads that share the KV
     head form the rows of one tile (padded to 16 for tl.dot); the split's tokens are walked in BLOCK_N-token
     tiles (64 tokens; 32 or 16 for fp32 caches, see _block_n; block ids looked up per token, so any
     power-of-two block size works) with an online softmax.
     Without splits it writes the normalized output; with splits, each split's running max, sum and unnormalized
     accumulator.
  2. `_combine_kernel` (splits only), one program per (request, head): rescales the splits to their common max
     and normalizes. Splits keep a GPU busy when few requests have long contexts (B x Hkv programs alone would
     leave most SMs idle); `num_splits` picks them from the SM count.

Loads are upcast to fp32 (the interpreter's bf16 is wrong, DESIGN.md §9); scores and accumulators are fp32;
the probabilities are cast to the cache dtype for the second dot, as flash attention does.
`paged_decode_ref` is the naive fp64 reference (also the CPU C kernel's, packserve.kernels.cpu_ops).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from packserve.kernels.norm_utils import interpreting

BLOCK_N = 64  # tokens per tile (half-precision caches; see _block_n)


def _block_n(dtype: torch.dtype, head_dim: int) -> int:
    """Tokens per tile. fp32 dots in IEEE mode stage far more shared memory (64 x 256 fp32 tiles: ~150 KB, over
    an sm_86/89 block's ~100 KB), so fp32 caches take smaller tiles: 32 up to head dim 128, else 16 (~50 KB)."""
    if dtype != torch.float32:
        return BLOCK_N
    return 32 if head_dim <= 128 else 16


@triton.jit
def _decode_kernel(Q, K, V, BT, SL, O, M, L, stride_qb, stride_bt, stride_slot, tiles_per_split, scale,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, BS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    s = tl.program_id(2)
    n_split = tl.num_programs(2)
    H = tl.num_programs(1) * G
    length = tl.load(SL + b)
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = g * G + rows
    row_ok = rows < G
    dim_ok = dims < D
    q = tl.load(Q + b * stride_qb + heads[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    start = s * tiles_per_split * BLOCK_N
    end = tl.minimum(length, start + tiles_per_split * BLOCK_N)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        tok_ok = j < end
        blk = tl.load(BT + b * stride_bt + j // BS, mask=tok_ok, other=0).to(tl.int64)
        slot = blk * BS + j % BS
        kv_off = slot[:, None] * stride_slot + g * D + dims[None, :]
        kv_ok = tok_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        if IEEE:
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:  # half q and K on the tensor cores, fp32 accumulation; the scale applies to the fp32 scores
            scores = tl.dot(q.to(k.dtype), tl.trans(k), out_dtype=tl.float32)
        scores = tl.where(tok_ok[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)  # the first tile: exp(-inf) = 0
        p = tl.exp(scores - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out_ok = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        part = (b * H + heads) * n_split + s  # [B, H, splits] partial results
        tl.store(M + part, m, mask=row_ok)
        tl.store(L + part, l_sum, mask=row_ok)
        tl.store(O + part[:, None] * D + dims[None, :], acc, mask=out_ok)
    else:
        out = acc / l_sum[:, None]
        tl.store(O + (b * H + heads)[:, None] * D + dims[None, :], out.to(O.dtype.element_ty), mask=out_ok)


@triton.jit
def _combine_kernel(M, L, ACC, O, n_split, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s, m = max_s m_s; an empty split has m_s = -inf."""
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    sp_ok = sp < n_split
    m = tl.load(M + bh * n_split + sp, mask=sp_ok, other=float("-inf"))
    l_sum = tl.load(L + bh * n_split + sp, mask=sp_ok, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    w = tl.where(sp_ok & (m > float("-inf")), w, 0.0)
    acc = tl.load(ACC + (bh * n_split + sp)[:, None] * D + dims[None, :], mask=sp_ok[:, None] & (dims < D)[None, :],
                  other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(O + bh * D + dims, out.to(O.dtype.element_ty), mask=dims < D)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device, block_n: int = BLOCK_N) -> int:
    """Splits per (request, KV head): enough programs for ~2 waves of the GPU's SMs, each split at least 4
    tiles long (shorter ones cost more in the combine than they save). 1 in the interpreter."""
    if device.type != "cuda" or interpreting():
        return 1
    tiles = -(-max_seq_len // block_n)
    want = -(-2 * _sm_count(device) // max(1, batch * kv_heads))
    return max(1, min(want, tiles // 4, 32))


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                                  max_seq_len: int, splits: int | None = None) -> torch.Tensor:
    """q: [B, H, D] (rows may be strided; heads and dims contiguous), caches [slots, Hkv, D] contiguous,
    block_table int [B, max_blocks], seq_lens int [B] (>= 1, context including the current token), all on one
    device; max_seq_len: a host-side bound on seq_lens (no device read). Returns [B, H, D] in q's dtype."""
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    if q.stride(2) != 1 or q.stride(1) != D or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q heads/dims and the caches must be contiguous")
    if H % Hkv or k_cache.shape[2] != D or v_cache.shape != k_cache.shape:
        raise ValueError("shape mismatch between q and the caches")
    if block_size & (block_size - 1):
        raise ValueError("block_size must be a power of 2")
    if block_table.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError("block_table and seq_lens need one row per request")
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    block_n = _block_n(k_cache.dtype, D)
    S = splits or num_splits(B, Hkv, max_seq_len, q.device, block_n)
    tiles = -(-max(1, max_seq_len) // block_n)
    tiles_per_split = -(-tiles // S)
    G = H // Hkv
    common = dict(G=G, D=D, BLOCK_G=_pow2(G), BLOCK_D=_pow2(D), BLOCK_N=block_n, BS=block_size,
                  IEEE=k_cache.dtype == torch.float32)
    if S == 1:
        _decode_kernel[(B, Hkv, 1)](q, k_cache, v_cache, block_table, seq_lens, out, out, out, q.stride(0),
                                    block_table.stride(0), Hkv * D, tiles_per_split, scale, SPLIT=False, **common)
        return out
    m = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    _decode_kernel[(B, Hkv, S)](q, k_cache, v_cache, block_table, seq_lens, acc, m, l_sum, q.stride(0),
                                block_table.stride(0), Hkv * D, tiles_per_split, scale, SPLIT=True, **common)
    _combine_kernel[(B * H,)](m, l_sum, acc, out, S, D=D, BLOCK_S=_pow2(S), BLOCK_D=_pow2(D))
    return out


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: list[list[int]],
                     seq_lens: list[int], block_size: int, scale: float) -> torch.Tensor:
    """Naive fp64 reference: per request and head, look up each cached token's slot, softmax, weighted sum."""
    B, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        slots = [block_table[b][j // block_size] * block_size + j % block_size for j in range(seq_lens[b])]
        for h in range(H):
            k = k_cache[slots, h // G].double().cpu()
            v = v_cache[slots, h // G].double().cpu()
            p = torch.softmax(k @ q[b, h].double().cpu() * scale, dim=0)
            out[b, h] = p @ v
    return out
