"""C kernels for the CPU path: paged decode attention, fused (add +) RMSNorm, RoPE, KV writes.

On CPU a decode step is a few memory-bound matmuls plus ~100 small ops; torch runs each small op as several
passes (RMSNorm: square, mean, rsqrt, two multiplies) with a dispatch each, and its paged-attention path
gathers every request's KV blocks into a padded copy before SDPA reads it again. These kernels do each job in
one pass over the data:

- `paged_decode_attention`: one query token per request; each cached K/V row is read once, in place in its
  block, for the G query heads that share it (GQA): s_j = scale * q . k_j (j < len), p = softmax(s),
  out = sum_j p_j v_j.
- `rms_norm`: Llama RMSNorm (fp32 statistics, then times weight or offset + weight), optionally after the residual
  add (`residual=`), whose sum is also returned.
- `rotary_`: rotate-half RoPE in place on q and k (strided views of the fused QKV output).
- `silu_mul`: the gated MLP's silu(gate) * up in one pass; `argmax_rows`: greedy sampling's row argmax.
- `pack_linear` / `linear_packed`: decode-sized linear layers (a few rows times every weight) on weights
  prepacked into 32-feature panels, register-tiled, with the next panel prefetched while one is multiplied (used
  per shape and row count only where it measured faster than MKL: packserve.layers.cpu_gemm).

KV-cache writes stay on torch's index_copy_, which was as fast as a C loop (benchmarks/cpu_ops.py).

The C source is kernels/cpu_kernels.c; compiling, caching and loading it live in packserve.kernels.cpu_lib; this
module holds the checked Python entry points. `available()` is False without a compiler; callers then keep their
torch paths. Each kernel has a pure-torch reference the tests compare with
(`packserve.kernels.paged_attention.paged_decode_ref`, `packserve.kernels.rmsnorm`, `packserve.layers.rotary`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from packserve.kernels.cpu_lib import available, handle

__all__ = ["PanelWeight", "argmax_rows", "available", "linear_packed", "pack_linear", "paged_decode_attention",
           "rms_norm", "rotary_", "silu_mul", "usable"]

PANEL = 32  # output features per weight panel (NR in the C source)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                           scale: float, check_values: bool = True) -> torch.Tensor:
    """q: [B, H, D] fp32 (rows may be strided, heads and dims contiguous); k/v_cache: [slots, Hkv, D] fp32
    contiguous, slot = block * block_size + offset; block_table: int64 [B, max_blocks]; seq_lens: int64 [B]
    (context length including the current token). Returns [B, H, D]. check_values=False skips the range
    checks of seq_lens (the runner builds them in range; each check is a tensor reduction per layer)."""
    available()  # builds the library on first use
    lib = handle()  # raises with the reason when it is unavailable
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    if q.dtype != torch.float32 or k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
        raise TypeError("the CPU paged decode kernel is fp32 only")
    if q.stride(2) != 1 or q.stride(1) != D or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q heads/dims and the caches must be contiguous")
    if H % Hkv or k_cache.shape[2] != D or v_cache.shape[1:] != k_cache.shape[1:]:
        raise ValueError("shape mismatch between q and the caches")
    block_table = block_table.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    if block_table.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError("block_table and seq_lens need one row per request")
    if check_values and B and int(seq_lens.min()) < 1:
        raise ValueError("every request attends at least one cached token")
    if check_values and B and int(seq_lens.max()) > block_table.shape[1] * block_size:
        raise ValueError("a sequence is longer than its block table")
    out = torch.empty(B, H, D, dtype=torch.float32)
    if B == 0:
        return out
    failed = lib.paged_decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(),
        block_table.shape[1], seq_lens.data_ptr(), out.data_ptr(), B, H, Hkv, D, block_size, scale)
    if failed:
        raise MemoryError("paged decode kernel: allocation failed")
    return out


def usable(*tensors: torch.Tensor) -> bool:
    """The dispatchers' rule: CPU fp32 tensors and the kernels built."""
    for t in tensors:
        if not t.is_cpu or t.dtype is not torch.float32:
            return False
    return available()


def _rows(x: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """x as [rows, cols] with a row stride (no copy when the last dim is contiguous)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]:
        raise ValueError(f"{name} must have a row layout")
    return x2, x2.stride(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or with residual (norm(x + residual), x + residual); fp32 CPU tensors, new outputs."""
    shape, cols = x.shape, x.shape[-1]
    if weight is not None and weight.shape != (cols,):
        raise ValueError("weight must have one value per column")
    if residual is not None and residual.shape != shape:
        raise ValueError("residual must match x")
    x2, sx = _rows(x, "x")
    rows = x2.shape[0]
    out = torch.empty(shape, dtype=torch.float32)
    r_ptr, sr, res_out = None, 0, None
    if residual is not None:
        r2, sr = _rows(residual, "residual")
        r_ptr, res_out = r2.data_ptr(), torch.empty(shape, dtype=torch.float32)
    if rows:
        handle().rms_norm_f32(x2.data_ptr(), sx, r_ptr, sr, None if res_out is None else res_out.data_ptr(), cols,
                              None if weight is None else weight.contiguous().data_ptr(), out.data_ptr(), cols,
                              rows, cols, eps, offset)
    return out if residual is None else (out, res_out)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            check_values: bool = True) -> None:
    """In place on x: [T, heads, D] (token stride free, heads and dims contiguous); cos/sin: [max_pos, rot/2].
    check_values=False skips the positions range check (the runner keeps positions under max_model_len)."""
    T, heads, D = x.shape
    if x.stride(2) != 1 or x.stride(1) != D:
        raise ValueError("x heads and dims must be contiguous")
    if positions.dtype != torch.int64 or positions.shape != (T,):
        raise ValueError("positions must be int64 [T]")
    cos, sin = cos.contiguous(), sin.contiguous()
    if check_values and T and int(positions.max()) >= cos.shape[0]:
        raise ValueError("position beyond the rotary table")
    if T:
        handle().rotary_f32(x.data_ptr(), x.stride(0), T, heads, D, positions.contiguous().data_ptr(), cos.data_ptr(),
                        sin.data_ptr(), 2 * cos.shape[1])


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2I] fp32 (gate first; rows may be strided) -> new [rows, I] = silu(gate) * up."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.dtype != torch.float32 or not gate_up.is_cpu:
        raise ValueError("gate_up must be fp32 CPU [rows, 2 * intermediate]")
    x, s = _rows(gate_up, "gate_up")
    rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, inter, dtype=torch.float32)
    if rows:
        handle().silu_mul_f32(x.data_ptr(), s, out.data_ptr(), rows, inter)
    return out


def argmax_rows(x: torch.Tensor) -> list[int]:
    """Per row of x [rows, n] fp32 (n >= 1): the first index of its maximum (of its first NaN if any), as
    torch.max(dim=-1).indices."""
    if x.dim() != 2 or x.shape[1] < 1 or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError("x must be fp32 CPU [rows, n >= 1]")
    x, s = _rows(x, "x")
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    if x.shape[0]:
        handle().argmax_rows_f32(x.data_ptr(), s, x.shape[0], x.shape[1], idx.data_ptr())
    return idx.tolist()


@dataclass(frozen=True)
class PanelWeight:
    """A linear weight [out, in] packed for `linear_packed`: panels [ceil(out / 32), in, 32] (the last one
    zero-padded) and the bias zero-padded to the panels' width."""
    panels: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PanelWeight:
    """weight: fp32 CPU [out, in] (nn.Linear layout); bias: [out] or None. A copy: the originals stay."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or not weight.is_cpu:
        raise ValueError("pack_linear takes a 2-D fp32 CPU weight")
    n, k = weight.shape
    if bias is not None and bias.shape != (n,):
        raise ValueError("bias must have one value per output feature")
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k)
    padded[:n] = weight
    b = None
    if bias is not None:
        b = torch.zeros(panels * PANEL)
        b[:n] = bias
    return PanelWeight(padded.view(panels, PANEL, k).transpose(1, 2).contiguous(), b, n, k)


def linear_packed(x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
    """x [M, in] fp32 (rows may be strided) @ weight^T + bias -> new [M, out]."""
    if x.dim() != 2 or x.shape[1] != w.in_features or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"x must be fp32 CPU [M, {w.in_features}]")
    x, sx = _rows(x, "x")
    out = torch.empty(x.shape[0], w.out_features, dtype=torch.float32)
    if x.shape[0]:
        handle().linear_panels_f32(x.data_ptr(), sx, w.panels.data_ptr(),
                                   None if w.bias is None else w.bias.data_ptr(), out.data_ptr(), x.shape[0],
                                   w.in_features, w.out_features)
    return out
