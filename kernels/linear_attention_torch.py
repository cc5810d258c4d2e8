"""Pure-torch linear attention: two independent references and the vectorized chunked CPU path.

All functions take feature-mapped q/k (phi already applied; see `linear_attention.py` for the maps)
in the flat packed layout q [T, Hq, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv] with `cu_seqlens` [N+1],
Hq a multiple of Hkv (query head h reads K/V head h // (Hq // Hkv)). The state belongs to the K/V
head: S [N, Hkv, Dk, Dv], z [N, Hkv, Dk].

    S_t = S_{t-1} + k_t v_t^T,   z_t = z_{t-1} + k_t
    o_t = q_t S_t / (q_t . z_t + eps)       (normalize=True)
    o_t = q_t S_t                           (normalize=False)

Everything computes in fp32 (fp64 when an input is fp64, for exactness checks) and returns
o in v's dtype and the final state in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 64
State = tuple[torch.Tensor, torch.Tensor]


# ---- shared host-side helpers -------------------------------------------------------------------

def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def host_seqlens(cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor | list[int] | None) -> list[int]:
    """The boundaries as Python ints. Without a host copy this reads the device tensor (one sync)."""
    src = cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu
    return [int(x) for x in (src.tolist() if isinstance(src, torch.Tensor) else src)]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 initial_state: State | None) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; returns (T, Hq, Hkv, Dk, Dv, N). Never reads device data."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    T, Hq, Dk = q.shape
    Hkv = k.shape[1]
    Dv = v.shape[2]
    if k.shape != (T, Hkv, Dk) or v.shape[:2] != (T, Hkv):
        raise ValueError(f"k must be [T, Hkv, Dk] and v [T, Hkv, Dv] with q [T, Hq, Dk]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    N = cu_seqlens.numel() - 1
    if initial_state is not None:
        S0, z0 = initial_state
        if tuple(S0.shape) != (N, Hkv, Dk, Dv) or tuple(z0.shape) != (N, Hkv, Dk):
            raise ValueError(f"initial_state must be (S [N, Hkv, Dk, Dv], z [N, Hkv, Dk]) = "
                             f"([{N}, {Hkv}, {Dk}, {Dv}], [{N}, {Hkv}, {Dk}]); got {tuple(S0.shape)}, {tuple(z0.shape)}")
    return T, Hq, Hkv, Dk, Dv, N


def check_host_seqlens(cu: list[int], T: int) -> None:
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}; got {cu[:4]}...{cu[-2:]}")


@dataclass(frozen=True)
class ChunkTable:
    """Host-built chunk index: chunk i covers tokens [start[i], start[i] + length[i]) of sequence seq[i];
    chunks are in token order; sequence n owns chunks first[n] .. first[n+1]-1."""
    seq: torch.Tensor      # [NT] int32
    start: torch.Tensor    # [NT] int32
    length: torch.Tensor   # [NT] int32
    local: torch.Tensor    # [NT] int32: index of the chunk within its sequence
    first: torch.Tensor    # [N+1] int32
    num_chunks: int
    max_local: int         # largest chunk count of one sequence


def chunk_table(cu: list[int] | tuple[int, ...], chunk: int = CHUNK) -> ChunkTable:
    """Vectorized on the host (no Python loop over chunks: it runs once per layer call)."""
    bounds = torch.tensor(cu, dtype=torch.int64)
    lens = bounds[1:] - bounds[:-1]
    per_seq = (lens + chunk - 1) // chunk
    first = torch.cat([torch.zeros(1, dtype=torch.int64), per_seq.cumsum(0)])
    NT = int(first[-1])
    seq = torch.repeat_interleave(torch.arange(len(lens)), per_seq)
    local = torch.arange(NT) - first[seq]
    start = bounds[seq] + local * chunk
    length = torch.minimum(bounds[seq + 1] - start, torch.tensor(chunk))
    i32 = lambda t: t.to(torch.int32)  # noqa: E731
    return ChunkTable(i32(seq), i32(start), i32(length), i32(local), i32(first), NT,
                      int(per_seq.max()) if len(lens) else 0)


def _zeros_state(N: int, Hkv: int, Dk: int, Dv: int, dtype: torch.dtype, device: torch.device) -> State:
    return (torch.zeros(N, Hkv, Dk, Dv, dtype=dtype, device=device),
            torch.zeros(N, Hkv, Dk, dtype=dtype, device=device))


# ---- reference 1: the recurrence, one token at a time ----------------------------------------------

def linear_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                           normalize: bool = True, eps: float = 1e-6,
                           initial_state: State | None = None) -> tuple[torch.Tensor, State]:
    """The definition, literally: a Python loop over sequences and tokens."""
    T, Hq, Hkv, Dk, Dv, N = check_inputs(q, k, v, cu_seqlens, initial_state)
    cd = compute_dtype(q, k, v)
    G = Hq // Hkv
    cu = host_seqlens(cu_seqlens, None)
    o = torch.zeros(T, Hq, Dv, dtype=cd, device=q.device)
    S_all, z_all = _zeros_state(N, Hkv, Dk, Dv, cd, q.device)
    for n in range(N):
        S = initial_state[0][n].to(cd).clone() if initial_state else S_all[n]
        z = initial_state[1][n].to(cd).clone() if initial_state else z_all[n]
        for t in range(cu[n], cu[n + 1]):
            kt, vt = k[t].to(cd), v[t].to(cd)                       # [Hkv, Dk], [Hkv, Dv]
            S = S + kt[:, :, None] * vt[:, None, :]
            z = z + kt
            qt = q[t].to(cd).view(Hkv, G, Dk)
            num = torch.einsum("hgk,hkv->hgv", qt, S)
            if normalize:
                num = num / (torch.einsum("hgk,hk->hg", qt, z)[..., None] + eps)
            o[t] = num.reshape(Hq, Dv)
        S_all[n], z_all[n] = S, z
    return o.to(v.dtype), (S_all, z_all)


# ---- reference 2: the quadratic form over the packed tokens ---------------------------------------

def linear_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                               normalize: bool = True, eps: float = 1e-6,
                               initial_state: State | None = None) -> torch.Tensor:
    """A = (q k^T) masked block-diagonal-causal over the whole packed batch, o = A v / rowsum(A) (+ the
    initial state's contribution q S0 / q z0). Shares no code path with the recurrence."""
    T, Hq, Hkv, Dk, Dv, N = check_inputs(q, k, v, cu_seqlens, initial_state)
    cd = compute_dtype(q, k, v)
    G = Hq // Hkv
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    seg = torch.repeat_interleave(torch.arange(N), lens).to(q.device)
    pos = torch.arange(T, device=q.device)
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])          # [T, T]
    qh = q.to(cd).transpose(0, 1)                                                    # [Hq, T, Dk]
    kh = k.to(cd).repeat_interleave(G, dim=1).transpose(0, 1)
    vh = v.to(cd).repeat_interleave(G, dim=1).transpose(0, 1)
    A = (qh @ kh.transpose(1, 2)) * mask                                             # [Hq, T, T]
    num = A @ vh
    den = A.sum(-1)
    if initial_state is not None:
        S0 = initial_state[0].to(cd).repeat_interleave(G, dim=1)[seg]                 # [T, Hq, Dk, Dv]
        z0 = initial_state[1].to(cd).repeat_interleave(G, dim=1)[seg]
        num = num + torch.einsum("thk,thkv->htv", q.to(cd), S0)
        den = den + torch.einsum("thk,thk->ht", q.to(cd), z0)
    if normalize:
        num = num / (den[..., None] + eps)
    return num.transpose(0, 1).to(v.dtype)


# ---- the vectorized chunked form (the CPU serving path) -------------------------------------------

def linear_attention_chunked_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                                   normalize: bool = True, eps: float = 1e-6, initial_state: State | None = None,
                                   output_final_state: bool = True, cu_seqlens_cpu: torch.Tensor | list[int] | None = None,
                                   chunk: int = CHUNK) -> tuple[torch.Tensor, State | None]:
    """Chunked form in batched torch ops: every chunk's intra-chunk causal matmul at once, then the
    chunk-start states by a loop over the chunk index (vectorized across sequences; max_len/64 steps,
    each exact, unlike a global cumsum minus offsets that cancels catastrophically across sequences)."""
    T, Hq, Hkv, Dk, Dv, N = check_inputs(q, k, v, cu_seqlens, initial_state)
    cd = compute_dtype(q, k, v)
    G = Hq // Hkv
    dev = q.device
    cu = host_seqlens(cu_seqlens, cu_seqlens_cpu)
    check_host_seqlens(cu, T)
    tab = chunk_table(cu, chunk)
    if initial_state is not None:
        S, z = initial_state[0].to(cd).clone(), initial_state[1].to(cd).clone()
    else:
        S, z = _zeros_state(N, Hkv, Dk, Dv, cd, dev)
    o = torch.empty(T, Hq, Dv, dtype=v.dtype, device=dev)
    if tab.num_chunks:
        NT = tab.num_chunks
        ar = torch.arange(chunk)
        valid = ar[None, :] < tab.length[:, None].long()                              # [NT, C]
        idx = torch.where(valid, tab.start[:, None].long() + ar[None, :], 0).to(dev)
        vmask = valid.to(dev, cd)[:, :, None, None]
        # Padded rows are zeroed so they add nothing to states or scores.
        Kc = (k.to(cd)[idx] * vmask).permute(0, 2, 1, 3)                              # [NT, Hkv, C, Dk]
        Vc = (v.to(cd)[idx] * vmask).permute(0, 2, 1, 3)                              # [NT, Hkv, C, Dv]
        Qc = q.to(cd)[idx].view(NT, chunk, Hkv, G, Dk).permute(0, 2, 3, 1, 4)         # [NT, Hkv, G, C, Dk]
        KV = Kc.transpose(-1, -2) @ Vc                                                 # [NT, Hkv, Dk, Dv]
        ksum = Kc.sum(2)                                                               # [NT, Hkv, Dk]
        S_start = torch.empty_like(KV)
        z_start = torch.empty_like(ksum)
        seq = tab.seq.long().to(dev)
        for j in range(tab.max_local):
            ids = (tab.local == j).nonzero().squeeze(1).to(dev)
            owners = seq[ids]
            S_start[ids], z_start[ids] = S[owners], z[owners]
            S[owners] += KV[ids]
            z[owners] += ksum[ids]
        causal = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=dev))
        A = (Qc @ Kc[:, :, None].transpose(-1, -2)) * causal                          # [NT, Hkv, G, C, C]
        num = Qc @ S_start[:, :, None] + A @ Vc[:, :, None]                            # [NT, Hkv, G, C, Dv]
        if normalize:
            den = (Qc @ z_start[:, :, None, :, None]).squeeze(-1) + A.sum(-1)          # [NT, Hkv, G, C]
            num = num / (den[..., None] + eps)
        rows = num.permute(0, 3, 1, 2, 4).reshape(NT * chunk, Hq, Dv)
        # Chunks are in token order, so the valid rows are exactly tokens 0..T-1.
        o.copy_(rows[valid.reshape(-1).to(dev)])
    return o, ((S, z) if output_final_state else None)


def linear_attention_decode_step_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor,
                                       z: torch.Tensor, *, normalize: bool = True, eps: float = 1e-6,
                                       state_indices: torch.Tensor | None = None,
                                       inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per sequence: q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv]; S/z hold B states, or a pool
    addressed by state_indices [B]. In place: S/z are updated and returned; else new [B, ...] states."""
    B, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    cd = S.dtype
    Sb = S if state_indices is None else S[state_indices]
    zb = z if state_indices is None else z[state_indices]
    kt, vt = k.to(cd), v.to(cd)
    S_new = Sb + kt[..., :, None] * vt[..., None, :]
    z_new = zb + kt
    qt = q.to(cd).view(B, Hkv, G, Dk)
    num = torch.einsum("bhgk,bhkv->bhgv", qt, S_new)
    if normalize:
        num = num / (torch.einsum("bhgk,bhk->bhg", qt, z_new)[..., None] + eps)
    o = num.reshape(B, Hq, Dv).to(v.dtype)
    if not inplace:
        return o, S_new, z_new
    if state_indices is None:
        S.copy_(S_new)
        z.copy_(z_new)
    else:
        S[state_indices] = S_new
        z[state_indices] = z_new
    return o, S, z
