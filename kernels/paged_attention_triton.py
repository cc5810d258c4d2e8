"""Paged attention for GPUs: a Triton kernel reading the KV blocks in place, for any number of query tokens per
request (a decode, a chunked-prefill continuation, a prompt behind a prefix-cache hit), its wrappers and references.

Each request's context sits in the paged KV cache ([slots, Hkv, D] per layer, slot = block * block_size + offset,
the request's blocks listed in its block-table row); its q_len new tokens (at positions ctx .. ctx + q_len - 1,
already written to the cache) attend causally to positions 0 .. their own. The torch path gathers every request's
blocks into a padded copy and masks it, which writes and reads the whole context again in every layer. This kernel
streams each request's K/V once per tile of queries, flash-decoding style:

  1. `_paged_kernel`, one program per (query tile, KV head, split): a query tile is up to BLOCK_Q consecutive new
     tokens of one request (the host lists the tiles: `tile_seq`, `tile_q0`); its rows are those tokens x the
     G = H / Hkv query heads sharing the KV head (BLOCK_Q x BLOCK_G >= 16 rows for tl.dot). The split's context
     is walked in BLOCK_N-token tiles (64 tokens; 32 or 16 for fp32 caches, see _block_n; block ids looked up per
     token, so any power-of-two block size works) with an online softmax, each row masked to its own causal
     limit. Without splits it writes the normalized output; with splits, each split's running max, sum and
     unnormalized accumulator.
  2. `_combine_kernel` (splits only), one program per (query token, head): rescales the splits to their common
     max and normalizes. Splits keep a GPU busy when few requests have long contexts; `num_splits` picks how many
     from the SM count, and each request's context is divided among them (so a CUDA graph captured with the
     split count of the model's whole context still spreads a short context over its splits).

Loads are upcast to fp32 (the Triton interpreter's bf16 arithmetic is wrong); scores and accumulators are fp32;
the probabilities are cast to the cache dtype for the second dot, as flash attention does.
`paged_attention_ref` is the naive fp64 reference; `paged_decode_ref` its one-token case (also the CPU C decode
kernel's, packserve.kernels.cpu_ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from packserve.kernels import triton_ops
from packserve.kernels.norm_utils import dot_block, interpreting, sm_count

BLOCK_N = 64  # tokens per tile (half-precision caches; see _block_n)


def _block_n(dtype: torch.dtype, head_dim: int) -> int:
    """Tokens per tile. fp32 dots in IEEE mode stage far more shared memory (64 x 256 fp32 tiles: ~150 KB, over
    an sm_86/89 block's ~100 KB), so fp32 caches take smaller tiles: 32 up to head dim 128, else 16 (~50 KB)."""
    if dtype != torch.float32:
        return BLOCK_N
    return 32 if head_dim <= 128 else 16


@triton.jit
def _paged_kernel(Q, K, V, BT, CTX, QLEN, QSTART, TSEQ, TQ0, O, M, L, stride_qt, stride_bt, stride_slot,
                  scale, G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
                  SPLIT: tl.constexpr, IEEE: tl.constexpr, DECODE: tl.constexpr = False,
                  MIN_SPLIT_TILES: tl.constexpr = 4):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    n_split = tl.num_programs(2)
    H = tl.num_programs(1) * G
    if DECODE:  # one new token per request, tile b = request b = query row b; CTX holds the sequence lengths
        b = tile.to(tl.int64)
        q0 = 0
        ctx = tl.load(CTX + b) - 1
        qlen = 1
        qstart = b
    else:
        b = tl.load(TSEQ + tile).to(tl.int64)
        q0 = tl.load(TQ0 + tile)
        ctx = tl.load(CTX + b)
        qlen = tl.load(QLEN + b)
        qstart = tl.load(QSTART + b).to(tl.int64)
    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    qi = q0 + rows // BLOCK_G  # the row's new token (0-based within the request)
    hg = rows % BLOCK_G
    heads = g * G + hg
    row_ok = (hg < G) & (qi < qlen)
    limit = ctx + qi + 1  # keys this row sees: positions < limit
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    tok = qstart + qi  # flat query token
    q = tl.load(Q + tok[:, None] * stride_qt + heads[:, None] * D + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
    kv_len = ctx + tl.minimum(q0 + BLOCK_Q, qlen)  # the tile's last row sees this many keys
    # Each request's own context is divided among the splits (at least MIN_SPLIT_TILES tiles each; later splits
    # may be empty), not a bound on every request's: a CUDA graph's split count is fixed by the model's context
    # length, and a short context must still spread over the splits.
    tiles_per_split = tl.maximum(tl.cdiv(tl.cdiv(kv_len, BLOCK_N), n_split), MIN_SPLIT_TILES)
    start = s * tiles_per_split * BLOCK_N
    end = tl.minimum(kv_len, start + tiles_per_split * BLOCK_N)
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
        seen = tok_ok[None, :] & (j[None, :] < limit[:, None])
        scores = tl.where(seen, scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        # A row with nothing seen yet (a later split than its causal limit) keeps m = -inf: subtract 0 instead,
        # so alpha and p are exp(-inf) = 0 rather than NaN.
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(scores - m_ref[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out_ok = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        part = (tok * H + heads) * n_split + s  # [T, H, splits] partial results
        tl.store(M + part, m, mask=row_ok)
        tl.store(L + part, l_sum, mask=row_ok)
        tl.store(O + part[:, None] * D + dims[None, :], acc, mask=out_ok)
    else:
        out = acc / l_sum[:, None]
        tl.store(O + (tok * H + heads)[:, None] * D + dims[None, :], out.to(O.dtype.element_ty), mask=out_ok)


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


def num_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device, block_n: int = BLOCK_N) -> int:
    """Splits per (request, KV head): enough programs for ~2 waves of the GPU's SMs, each split at least 4
    tiles long (shorter ones cost more in the combine than they save). 1 in the interpreter."""
    if device.type != "cuda" or interpreting():
        return 1
    tiles = -(-max_seq_len // block_n)
    want = -(-2 * sm_count(device) // max(1, batch * kv_heads))
    return max(1, min(want, tiles // 4, 32))


@dataclass(frozen=True)
class PagedTiles:
    """A step's query tiles for `_paged_kernel`, built on the host once per step (`query_tiles`)."""

    tile_seq: torch.Tensor  # int32 [tiles]: the request of each tile
    tile_q0: torch.Tensor  # int32 [tiles]: its first new token (0-based within the request)
    block_q: int  # new tokens per tile


# A decode step's tiles: one per request, derived in the kernel (DECODE).
DECODE_TILES = PagedTiles(None, None, 1)


def block_q_for(max_q_len: int, heads_per_kv: int) -> int:
    """Query tokens per tile: 1 for decodes (the G heads are the rows, padded to 16), else enough tokens for ~64
    rows (a longer tile reuses each K/V tile for more queries)."""
    return 1 if max_q_len <= 1 else max(1, 64 // triton.next_power_of_2(heads_per_kv))


def query_tiles(q_lens: list[int], block_q: int, device: torch.device) -> PagedTiles:
    seq, q0 = [], []
    for b, n in enumerate(q_lens):
        for i in range(0, n, block_q):
            seq.append(b)
            q0.append(i)
    t = torch.tensor([seq, q0], dtype=torch.int32).to(device, non_blocking=True)
    return PagedTiles(t[0], t[1], block_q)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           ctx_lens: torch.Tensor, q_lens: torch.Tensor, q_start: torch.Tensor, tiles: PagedTiles,
                           block_size: int, scale: float, max_kv_len: int, splits: int | None = None,
                           decode: bool = False) -> torch.Tensor:
    """q: [T, H, D] new tokens of B requests, request b's at rows q_start[b] .. q_start[b] + q_lens[b] - 1 (rows may
    be strided; heads and dims contiguous); caches [slots, Hkv, D] contiguous, the new tokens' K/V already in
    them; block_table int [B, max_blocks]; ctx_lens, q_lens, q_start int [B] (ctx_lens: cached tokens before the
    new ones); tiles from query_tiles(q_lens); max_kv_len: a host-side bound on ctx + q_len (no device read).
    decode: one new token per request (T = B): ctx_lens then holds the sequence lengths (context including the
    new token) and q_lens, q_start and the tiles are not read (a decode step allocates no index tensors).
    Returns [T, H, D] in q's dtype."""
    T, H, D = q.shape
    Hkv = k_cache.shape[1]
    B = block_table.shape[0]
    if q.stride(2) != 1 or q.stride(1) != D or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q heads/dims and the caches must be contiguous")
    if H % Hkv or k_cache.shape[2] != D or v_cache.shape != k_cache.shape:
        raise ValueError("shape mismatch between q and the caches")
    if block_size & (block_size - 1):
        raise ValueError("block_size must be a power of 2")
    if not (ctx_lens.shape == q_lens.shape == q_start.shape == (B,)):
        raise ValueError("block_table, ctx_lens, q_lens and q_start need one row per request")
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    n_tiles = B if decode else tiles.tile_seq.shape[0]
    if T == 0 or n_tiles == 0:
        return out
    block_table = block_table.contiguous()
    block_n = _block_n(k_cache.dtype, D)
    S = splits or num_splits(n_tiles, Hkv, max_kv_len, q.device, block_n)
    G = H // Hkv
    common = dict(G=G, D=D, BLOCK_Q=tiles.block_q, BLOCK_G=dot_block(G) if tiles.block_q == 1 else triton.next_power_of_2(G),
                  BLOCK_D=dot_block(D), BLOCK_N=block_n, BS=block_size, IEEE=k_cache.dtype == torch.float32,
                  DECODE=decode)
    if common["BLOCK_Q"] * common["BLOCK_G"] < 16:
        raise ValueError("a query tile needs at least 16 rows (block_q x heads per KV head)")
    args = (block_table, ctx_lens, q_lens, q_start, tiles.tile_seq, tiles.tile_q0)
    if S == 1:
        _paged_kernel[(n_tiles, Hkv, 1)](q, k_cache, v_cache, *args, out, out, out, q.stride(0),
                                         block_table.stride(0), Hkv * D, scale, SPLIT=False,
                                         **common)
        return out
    m = torch.empty(T, H, S, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(T, H, S, D, dtype=torch.float32, device=q.device)
    _paged_kernel[(n_tiles, Hkv, S)](q, k_cache, v_cache, *args, acc, m, l_sum, q.stride(0),
                                     block_table.stride(0), Hkv * D, scale, SPLIT=True, **common)
    _combine_kernel[(T * H,)](m, l_sum, acc, out, S, D=D, BLOCK_S=dot_block(S), BLOCK_D=dot_block(D))
    return out


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                                  max_seq_len: int, splits: int | None = None) -> torch.Tensor:
    """One new token per request: q [B, H, D], seq_lens int [B] (>= 1, context including the current token);
    paged_attention_triton with q_lens = 1. Returns [B, H, D] in q's dtype."""
    B = q.shape[0]
    if block_table.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError("block_table and seq_lens need one row per request")
    return paged_attention_triton(q, k_cache, v_cache, block_table, seq_lens, seq_lens, seq_lens, DECODE_TILES,
                                  block_size, scale, max_seq_len, splits, decode=True)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: list[list[int]],
                        ctx_lens: list[int], q_lens: list[int], block_size: int, scale: float) -> torch.Tensor:
    """Naive fp64 reference: new token i of request b (flat row sum(q_lens[:b]) + i) attends to its request's
    positions 0 .. ctx_lens[b] + i."""
    H, D = q.shape[1], q.shape[2]
    G = H // k_cache.shape[1]
    out = torch.empty(q.shape[0], H, D, dtype=torch.float64)
    row = 0
    for b, (ctx, n) in enumerate(zip(ctx_lens, q_lens)):
        for i in range(n):
            slots = [block_table[b][j // block_size] * block_size + j % block_size for j in range(ctx + i + 1)]
            for h in range(H):
                k = k_cache[slots, h // G].double().cpu()
                v = v_cache[slots, h // G].double().cpu()
                p = torch.softmax(k @ q[row, h].double().cpu() * scale, dim=0)
                out[row, h] = p @ v
            row += 1
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


def _fake_attention(q, *_):
    return q.new_empty(q.shape)


triton_ops.register(
    "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor ctx_lens, Tensor q_lens, "
    "Tensor q_start, Tensor tile_seq, Tensor tile_q0, int block_q, int block_size, float scale, int max_kv_len) "
    "-> Tensor",
    lambda q, kc, vc, bt, ctx, ql, qs, ts, tq, bq, bs, scale, mx: paged_attention_triton(
        q, kc, vc, bt, ctx, ql, qs, PagedTiles(ts, tq, bq), bs, scale, mx), _fake_attention)
triton_ops.register(
    "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
    "int block_size, float scale, int max_seq_len) -> Tensor",
    lambda q, kc, vc, bt, sl, bs, scale, mx: paged_decode_attention_triton(q, kc, vc, bt, sl, bs, scale, mx),
    _fake_attention)

