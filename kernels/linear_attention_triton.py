"""Triton linear attention over packed sequences: chunked prefill, recurrent token loop, decode step.

Same layout and semantics as `linear_attention_torch.py` (q [T, Hq, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv],
cu_seqlens [N+1], state S [N, Hkv, Dk, Dv] / z [N, Hkv, Dk] in fp32; q/k already feature-mapped).

Chunked forward, two launches (the split flash-linear-attention uses for chunk_h / chunk_o):
  1. `_chunk_state_kernel`, one program per (sequence, K/V head, Dk block, Dv block): walks the sequence's
     chunks in order, stores the state at each chunk's start, adds K_c^T V_c; writes the final state.
  2. `_chunk_output_kernel`, one program per (chunk, query head, Dv block), all chunks in parallel:
     o = q S_start + tril(q K_c^T) V_c, denominator q . z_start + rowsum(tril(q K_c^T)).
The chunk table (which chunk belongs to which sequence) is built on the host from a host copy of
cu_seqlens, so nothing here waits on the device.

Every load is upcast to fp32 before arithmetic: the Triton interpreter's bf16 arithmetic is wrong, and
fp32 accumulation is what we want on a GPU too. Dots on fp32 operands use IEEE fp32 for fp32 inputs and
TF32 for half inputs (exact for the fp16/bf16 products; the fp32 scores/states lose ~1e-3 relative,
below the half-precision output rounding).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from packserve.kernels.linear_attention_torch import (CHUNK, State, check_host_seqlens, check_inputs, chunk_table,
                                                      host_seqlens)
from packserve.kernels.norm_utils import SUPPORTED_DTYPES, dot_block, interpreting, sm_count

# Tests set this to fill every buffer the wrappers allocate with NaN, so unwritten elements show.
POISON_ALLOCATIONS = False


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_ALLOCATIONS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(Dk: int, Dv: int) -> tuple[int, int]:
    # The interpreter runs programs one by one in Python: fewer, larger blocks. On a GPU, 64 x 64 fp32
    # state tiles keep registers in check while giving N x H x (Dk/64) x (Dv/64) programs.
    if interpreting():
        return dot_block(Dk), dot_block(Dv)
    return min(64, dot_block(Dk)), min(64, dot_block(Dv))


@functools.lru_cache(maxsize=16)
def _device_table(cu: tuple[int, ...], device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num chunks, first chunk per sequence, chunk -> sequence, chunk start) on the device. Cached: every
    layer of a model step sees the same boundaries, so the table is built and copied once per step."""
    tab = chunk_table(cu, CHUNK)
    return tab.num_chunks, *(x.to(device, non_blocking=True) for x in (tab.first, tab.seq, tab.start))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_dtypes(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Triton linear attention supports {SUPPORTED_DTYPES}, got {t.dtype}")


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- chunked forward ---------------------------------------------------------------------------------

@triton.jit
def _chunk_state_kernel(K, V, CU, FIRST, S0, Z0, HS, HZ, SF, ZF,
                        stride_kt, stride_kh, stride_vt, stride_vh, HKV, DK, DV,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INITIAL: tl.constexpr,
                        STORE_FINAL: tl.constexpr, PRECISION: tl.constexpr):
    pid_v, pid_k, pid_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, h = pid_nh // HKV, pid_nh % HKV
    bos = tl.load(CU + n).to(tl.int64)
    eos = tl.load(CU + n + 1).to(tl.int64)
    first = tl.load(FIRST + n).to(tl.int64)
    kk = pid_k * BK + tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    k_ok, v_ok = kk < DK, vv < DV
    s_off = kk[:, None] * DV + vv[None, :]          # offsets inside one contiguous [DK, DV] state
    s_mask = k_ok[:, None] & v_ok[None, :]
    nh = n * HKV + h
    if HAS_INITIAL:
        S = tl.load(S0 + nh * DK * DV + s_off, mask=s_mask, other=0.0).to(tl.float32)
        z = tl.load(Z0 + nh * DK + kk, mask=k_ok, other=0.0).to(tl.float32)
    else:
        S = tl.full([BK, BV], 0.0, tl.float32)
        z = tl.full([BK], 0.0, tl.float32)
    rows = tl.arange(0, C)
    for c in range(0, (eos - bos + C - 1) // C):
        slot = (first + c) * HKV + h
        tl.store(HS + slot * DK * DV + s_off, S.to(HS.dtype.element_ty), mask=s_mask)
        if pid_v == 0:  # one Dv block owns z
            tl.store(HZ + slot * DK + kk, z, mask=k_ok)
        t = bos + c * C + rows
        t_ok = t < eos
        kT = tl.load(K + t[None, :] * stride_kt + h * stride_kh + kk[:, None],
                     mask=k_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)      # [BK, C]
        vb = tl.load(V + t[:, None] * stride_vt + h * stride_vh + vv[None, :],
                     mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)      # [C, BV]
        S += tl.dot(kT, vb, input_precision=PRECISION)
        z += tl.sum(kT, axis=1)
    if STORE_FINAL:
        tl.store(SF + nh * DK * DV + s_off, S, mask=s_mask)
        if pid_v == 0:
            tl.store(ZF + nh * DK + kk, z, mask=k_ok)


@triton.jit
def _chunk_output_kernel(Q, K, V, O, CU, SEQ, START, HS, HZ,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                         HKV, GROUP, DK, DV, eps,
                         C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr,
                         PRECISION: tl.constexpr):
    pid_v, i, hq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = hq // GROUP
    n = tl.load(SEQ + i)
    start = tl.load(START + i).to(tl.int64)
    eos = tl.load(CU + n + 1).to(tl.int64)
    rows = tl.arange(0, C)
    t = start + rows
    t_ok = t < eos
    vv = pid_v * BV + tl.arange(0, BV)
    v_ok = vv < DV
    slot = i.to(tl.int64) * HKV + h
    acc = tl.full([C, BV], 0.0, tl.float32)
    A = tl.full([C, C], 0.0, tl.float32)
    den = tl.full([C], 0.0, tl.float32)
    for k0 in range(0, DK, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < DK
        qb = tl.load(Q + t[:, None] * stride_qt + hq * stride_qh + kk[None, :],
                     mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)      # [C, BK]
        kT = tl.load(K + t[None, :] * stride_kt + h * stride_kh + kk[:, None],
                     mask=k_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)      # [BK, C]
        S = tl.load(HS + slot * DK * DV + kk[:, None] * DV + vv[None, :],
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)       # [BK, BV]
        acc += tl.dot(qb, S, input_precision=PRECISION)
        A += tl.dot(qb, kT, input_precision=PRECISION)
        if NORMALIZE:
            z = tl.load(HZ + slot * DK + kk, mask=k_ok, other=0.0)
            den += tl.sum(qb * z[None, :], axis=1)
    A = tl.where(rows[:, None] >= rows[None, :], A, 0.0)     # causal inside the chunk
    vb = tl.load(V + t[:, None] * stride_vt + h * stride_vh + vv[None, :],
                 mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    acc += tl.dot(A, vb, input_precision=PRECISION)
    if NORMALIZE:
        den += tl.sum(A, axis=1)
        acc = acc / (den + eps)[:, None]
    tl.store(O + t[:, None] * stride_ot + hq * stride_oh + vv[None, :], acc.to(O.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])


def linear_attention_chunked_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                                    normalize: bool = True, eps: float = 1e-6, initial_state: State | None = None,
                                    output_final_state: bool = True,
                                    cu_seqlens_cpu: torch.Tensor | list[int] | None = None
                                    ) -> tuple[torch.Tensor, State | None]:
    """Chunked (C = 64) forward. Pass `cu_seqlens_cpu` (a host copy) to avoid reading cu_seqlens back."""
    T, Hq, Hkv, Dk, Dv, N = check_inputs(q, k, v, cu_seqlens, initial_state)
    _check_dtypes(q, k, v)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    dev = q.device
    cu = host_seqlens(cu_seqlens, cu_seqlens_cpu)
    check_host_seqlens(cu, T)
    NT, first, seq, start = _device_table(tuple(cu), dev)
    o = _alloc((T, Hq, Dv), v.dtype, dev)
    SF = _alloc((N, Hkv, Dk, Dv), torch.float32, dev) if output_final_state else None
    ZF = _alloc((N, Hkv, Dk), torch.float32, dev) if output_final_state else None
    # Chunk-start states in the input dtype for bf16 (halves their traffic; bf16 keeps the range),
    # fp32 otherwise (fp16 could overflow on long sequences).
    hs_dtype = torch.bfloat16 if k.dtype == torch.bfloat16 else torch.float32
    HS = _alloc((max(NT, 1), Hkv, Dk, Dv), hs_dtype, dev)
    HZ = _alloc((max(NT, 1), Hkv, Dk), torch.float32, dev)
    cu_dev = cu_seqlens.to(dev, torch.int32)
    if initial_state is not None:
        S0, Z0 = initial_state[0].contiguous(), initial_state[1].contiguous()
    else:
        S0 = Z0 = HZ  # unused (HAS_INITIAL=False); any valid pointer
    BK, BV = _blocks(Dk, Dv)
    prec = _precision(q.dtype)
    # The state pass is sequential along each sequence: with few (sequence, head) pairs, narrower Dv
    # blocks give more programs to spread over the SMs.
    bv_state = BV
    while (bv_state > 16 and dev.type == "cuda"
           and N * Hkv * triton.cdiv(Dk, BK) * triton.cdiv(Dv, bv_state) < sm_count(dev)):
        bv_state //= 2
    if N:
        _chunk_state_kernel[(triton.cdiv(Dv, bv_state), triton.cdiv(Dk, BK), N * Hkv)](
            k, v, cu_dev, first, S0, Z0, HS, HZ, SF if SF is not None else HZ, ZF if ZF is not None else HZ,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), Hkv, Dk, Dv,
            C=CHUNK, BK=BK, BV=bv_state, HAS_INITIAL=initial_state is not None, STORE_FINAL=output_final_state,
            PRECISION=prec)
    if NT:
        _chunk_output_kernel[(triton.cdiv(Dv, BV), NT, Hq)](
            q, k, v, o, cu_dev, seq, start, HS, HZ,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            Hkv, Hq // Hkv, Dk, Dv, eps,
            C=CHUNK, BK=BK, BV=BV, NORMALIZE=normalize, PRECISION=prec)
    return o, ((SF, ZF) if output_final_state else None)


# ---- recurrent: one token at a time ----------------------------------------------------------------

@triton.jit
def _read_out(q_tok, o_tok, stride_qh, stride_oh, h, kk, k_ok, vv, v_ok, S, z, eps,
              GROUP: tl.constexpr, NORMALIZE: tl.constexpr):
    """One token's outputs for the GROUP query heads sharing K/V head h: o = q S, over (q . z + eps) if
    NORMALIZE (S: [BK, BV] state block, z: [BK])."""
    for g in tl.static_range(GROUP):
        hq = h * GROUP + g
        qt = tl.load(q_tok + hq * stride_qh + kk, mask=k_ok, other=0.0).to(tl.float32)
        ot = tl.sum(qt[:, None] * S, axis=0)
        if NORMALIZE:
            ot = ot / (tl.sum(qt * z, axis=0) + eps)
        tl.store(o_tok + hq * stride_oh + vv, ot.to(o_tok.dtype.element_ty), mask=v_ok)


@triton.jit
def _recurrent_kernel(Q, K, V, O, CU, S0, Z0, SF, ZF,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                      HKV, DK, DV, eps, GROUP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      NORMALIZE: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr):
    # One program per (Dv block, sequence x K/V head); the whole Dk in registers (z needs all of it).
    pid_v, pid_nh = tl.program_id(0), tl.program_id(1)
    n, h = pid_nh // HKV, pid_nh % HKV
    bos = tl.load(CU + n).to(tl.int64)
    eos = tl.load(CU + n + 1).to(tl.int64)
    kk = tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    k_ok, v_ok = kk < DK, vv < DV
    s_off = kk[:, None] * DV + vv[None, :]
    s_mask = k_ok[:, None] & v_ok[None, :]
    nh = n * HKV + h
    if HAS_INITIAL:
        S = tl.load(S0 + nh * DK * DV + s_off, mask=s_mask, other=0.0).to(tl.float32)
        z = tl.load(Z0 + nh * DK + kk, mask=k_ok, other=0.0).to(tl.float32)
    else:
        S = tl.full([BK, BV], 0.0, tl.float32)
        z = tl.full([BK], 0.0, tl.float32)
    for t in range(bos, eos):
        kt = tl.load(K + t * stride_kt + h * stride_kh + kk, mask=k_ok, other=0.0).to(tl.float32)
        vt = tl.load(V + t * stride_vt + h * stride_vh + vv, mask=v_ok, other=0.0).to(tl.float32)
        S += kt[:, None] * vt[None, :]
        z += kt
        _read_out(Q + t * stride_qt, O + t * stride_ot, stride_qh, stride_oh, h, kk, k_ok, vv, v_ok, S, z, eps,
                  GROUP, NORMALIZE)
    if STORE_FINAL:
        tl.store(SF + nh * DK * DV + s_off, S, mask=s_mask)
        if pid_v == 0:
            tl.store(ZF + nh * DK + kk, z, mask=k_ok)


def linear_attention_recurrent_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                                      normalize: bool = True, eps: float = 1e-6, initial_state: State | None = None,
                                      output_final_state: bool = True) -> tuple[torch.Tensor, State | None]:
    """Token-loop kernel: the middle link between the naive loop and the chunked kernel (not fast)."""
    T, Hq, Hkv, Dk, Dv, N = check_inputs(q, k, v, cu_seqlens, initial_state)
    _check_dtypes(q, k, v)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    dev = q.device
    o = _alloc((T, Hq, Dv), v.dtype, dev)
    SF = _alloc((N, Hkv, Dk, Dv), torch.float32, dev) if output_final_state else o
    ZF = _alloc((N, Hkv, Dk), torch.float32, dev) if output_final_state else o
    S0, Z0 = (initial_state[0].contiguous(), initial_state[1].contiguous()) if initial_state is not None else (o, o)
    BK = dot_block(Dk)
    _, BV = _blocks(Dk, Dv)
    if N and T:
        _recurrent_kernel[(triton.cdiv(Dv, BV), N * Hkv)](
            q, k, v, o, cu_seqlens.to(dev, torch.int32), S0, Z0, SF, ZF,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            Hkv, Dk, Dv, eps, GROUP=Hq // Hkv, BK=BK, BV=BV,
            NORMALIZE=normalize, HAS_INITIAL=initial_state is not None, STORE_FINAL=output_final_state)
    elif output_final_state:  # no tokens at all: the final state is the initial one
        SF.copy_(S0 if initial_state is not None else torch.zeros_like(SF))
        ZF.copy_(Z0 if initial_state is not None else torch.zeros_like(ZF))
    return o, ((SF, ZF) if output_final_state else None)


# ---- decode: one new token per sequence, states in place ----------------------------------------------

@triton.jit
def _decode_kernel(Q, K, V, O, S_IN, Z_IN, S_OUT, Z_OUT, IDX,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
                   HKV, DK, DV, eps, GROUP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   NORMALIZE: tl.constexpr, HAS_INDEX: tl.constexpr, OUT_AT_SLOT: tl.constexpr):
    # One program owns one (sequence, K/V head) state: it updates z first, then walks the Dv blocks,
    # so reading and writing the same state in place needs no cross-program ordering.
    pid = tl.program_id(0)
    b, h = pid // HKV, pid % HKV
    if HAS_INDEX:
        slot = tl.load(IDX + b).to(tl.int64)
    else:
        slot = b.to(tl.int64)
    out_slot = slot if OUT_AT_SLOT else b.to(tl.int64)
    kk = tl.arange(0, BK)
    k_ok = kk < DK
    kt = tl.load(K + b * stride_kb + h * stride_kh + kk, mask=k_ok, other=0.0).to(tl.float32)
    z = tl.load(Z_IN + (slot * HKV + h) * DK + kk, mask=k_ok, other=0.0) + kt
    tl.store(Z_OUT + (out_slot * HKV + h) * DK + kk, z, mask=k_ok)
    s_in = S_IN + (slot * HKV + h) * DK * DV
    s_out = S_OUT + (out_slot * HKV + h) * DK * DV
    for v0 in range(0, DV, BV):
        vv = v0 + tl.arange(0, BV)
        v_ok = vv < DV
        s_off = kk[:, None] * DV + vv[None, :]
        s_mask = k_ok[:, None] & v_ok[None, :]
        vt = tl.load(V + b * stride_vb + h * stride_vh + vv, mask=v_ok, other=0.0).to(tl.float32)
        S = tl.load(s_in + s_off, mask=s_mask, other=0.0) + kt[:, None] * vt[None, :]
        tl.store(s_out + s_off, S, mask=s_mask)
        _read_out(Q + b * stride_qb, O + b * stride_ob, stride_qh, stride_oh, h, kk, k_ok, vv, v_ok, S, z, eps,
                  GROUP, NORMALIZE)


def linear_attention_decode_step_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor,
                                        z: torch.Tensor, *, normalize: bool = True, eps: float = 1e-6,
                                        state_indices: torch.Tensor | None = None,
                                        inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv]; S [M, Hkv, Dk, Dv] / z [M, Hkv, Dk] fp32 contiguous,
    M = B, or a pool of states addressed by state_indices [B] (distinct slots). In place: S/z updated
    and returned; else new [B, ...] states are returned and S/z are left alone."""
    _check_dtypes(q, k, v)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("decode step takes q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv]")
    B, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if S.dtype != torch.float32 or z.dtype != torch.float32 or not S.is_contiguous() or not z.is_contiguous():
        raise ValueError("decode states must be contiguous fp32")
    M = S.shape[0]
    if tuple(S.shape) != (M, Hkv, Dk, Dv) or tuple(z.shape) != (M, Hkv, Dk):
        raise ValueError(f"S must be [M, {Hkv}, {Dk}, {Dv}] and z [M, {Hkv}, {Dk}]; got {tuple(S.shape)}, {tuple(z.shape)}")
    if state_indices is None and M != B:
        raise ValueError(f"without state_indices S must hold one state per sequence ({B}), got {M}")
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    dev = q.device
    o = _alloc((B, Hq, Dv), v.dtype, dev)
    if inplace:
        S_out, z_out = S, z
    else:
        S_out, z_out = _alloc((B, Hkv, Dk, Dv), torch.float32, dev), _alloc((B, Hkv, Dk), torch.float32, dev)
    BK = dot_block(Dk)
    BV = min(dot_block(Dv), 64 if BK <= 64 else 32)  # keep the [BK, BV] tile modest
    if B:
        _decode_kernel[(B * Hkv,)](
            q, k, v, o, S, z, S_out, z_out, state_indices if state_indices is not None else S,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            Hkv, Dk, Dv, eps, GROUP=Hq // Hkv, BK=BK, BV=BV, NORMALIZE=normalize,
            HAS_INDEX=state_indices is not None, OUT_AT_SLOT=inplace)
    return o, S_out, z_out
