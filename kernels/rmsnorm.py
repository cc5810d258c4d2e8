"""RMSNorm and residual-add + RMSNorm: Triton kernels, host wrappers, pure-torch references.

Semantics (transformers' LlamaRMSNorm): statistics and normalization in fp32, the
normalized value is cast to the input dtype, then multiplied by the weight:
    y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
With offset != 0 the gain is (offset + weight) and, as in Gemma, the multiply happens in
fp32 before the single cast. weight=None means no affine (Pre-RMSNorm after folding).

The fused variant returns (rms_norm(x + residual), x + residual); the sum is rounded to
the input dtype before the norm reads it, i.e. exactly an eager add followed by rms_norm.

`rms_norm` / `fused_add_rms_norm` dispatch: Triton on CUDA tensors, the reference
elsewhere. `*_triton` and `*_ref` are the explicit paths (the Triton ones run on CPU
tensors under TRITON_INTERPRET=1; the references compute in fp32, fp64 inputs in fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from packserve.kernels import cpu_ops, triton_ops
from packserve.kernels.norm_utils import (as_rows, check_out, check_param, check_same, fused_add_ref, fused_outputs,
                                          launch_config, load_row_input, stat_dtype, store_scaled, use_triton)


@triton.jit
def _rms_norm_kernel(X, R, W, Y, RO, n_rows, n_cols, width, stride_x, stride_r, stride_y, stride_ro, eps, offset,
                     HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, SCALE_IN_FP32: tl.constexpr,
                     COMPRESSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr):
    """RMSNorm over n_cols columns: mean square = sum(x^2) / width (width = n_cols). COMPRESSED is CRMSNorm
    (packserve.kernels.crmsnorm): the row holds d-1 coordinates of a zero-mean vector of width d, so
    mean square = (sum(x^2) + sum(x)^2) / width with width = d."""
    # int64 row offsets: rows x stride passes 2^31 elements for large batches.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    row_ok = rows < n_rows
    x_row, r_row, y_row, ro_row = X + rows * stride_x, R + rows * stride_r, Y + rows * stride_y, RO + rows * stride_ro
    if SINGLE:
        # The whole row fits one block: read once, keep it in registers.
        cols = tl.arange(0, BLOCK_N)[None, :]
        col_ok = cols < n_cols
        mask = row_ok & col_ok
        x = load_row_input(x_row + cols, r_row + cols, ro_row + cols, mask, HAS_RESIDUAL)
        sq = tl.sum(x * x, axis=1)
        if COMPRESSED:
            s = tl.sum(x, axis=1)
            sq += s * s
        rstd = tl.rsqrt(sq / width + eps)[:, None]
        store_scaled(y_row + cols, W + cols, x * rstd, mask, col_ok, offset, HAS_WEIGHT, SCALE_IN_FP32)
    else:
        # Wide rows: accumulate the sums over column blocks, then normalize in a second pass.
        acc_sq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            mask = row_ok & (cols < n_cols)
            x = load_row_input(x_row + cols, r_row + cols, ro_row + cols, mask, HAS_RESIDUAL)
            acc_sq += x * x
            if COMPRESSED:
                acc += x
        sq = tl.sum(acc_sq, axis=1)
        if COMPRESSED:
            s = tl.sum(acc, axis=1)
            sq += s * s
        rstd = tl.rsqrt(sq / width + eps)[:, None]
        if HAS_RESIDUAL:
            # Pass 2 re-reads the rounded sums (the inputs may be overwritten when in place).
            tl.debug_barrier()
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            col_ok = cols < n_cols
            mask = row_ok & col_ok
            if HAS_RESIDUAL:
                x = tl.load(ro_row + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            store_scaled(y_row + cols, W + cols, x * rstd, mask, col_ok, offset, HAS_WEIGHT, SCALE_IN_FP32)


def launch(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor | None, y2: torch.Tensor,
           ro2: torch.Tensor | None, eps: float, offset: float, block_n: int | None,
           compressed_width: int | None = None) -> None:
    """Run the kernel on row views; compressed_width = d turns it into CRMSNorm."""
    rows, width = x2.shape
    if rows == 0:
        return
    block_m, block_n, num_warps, single = launch_config(rows, width, block_n)
    has_residual = r2 is not None
    # Unused pointer slots get a valid tensor; the constexpr flags keep them untouched.
    r2 = x2 if r2 is None else r2
    ro2 = y2 if ro2 is None else ro2
    w = x2 if weight is None else weight
    grid = (triton.cdiv(rows, block_m),)
    _rms_norm_kernel[grid](
        x2, r2, w, y2, ro2, rows, width, width if compressed_width is None else compressed_width,
        x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0), eps, offset,
        HAS_RESIDUAL=has_residual, HAS_WEIGHT=weight is not None, SCALE_IN_FP32=offset != 0.0,
        COMPRESSED=compressed_width is not None, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single,
        num_warps=num_warps)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, offset: float = 0.0,
                    out: torch.Tensor | None = None, block_n: int | None = None) -> torch.Tensor:
    x2 = as_rows("x", x, copy_ok=True)
    check_param("weight", weight, x.shape[-1], x.device)
    check_out("out", out, x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    launch(x2, None, weight, as_rows("out", out), None, float(eps), float(offset), block_n)
    return out


def fused_add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                              eps: float = 1e-6, inplace: bool = False, offset: float = 0.0,
                              out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                              block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual). inplace: the output goes to x, the new residual to residual."""
    x2 = as_rows("x", x)
    check_same("residual", residual, x)
    check_param("weight", weight, x.shape[-1], x.device)
    out, residual_out = fused_outputs(x, residual, out, residual_out, inplace)
    launch(x2, as_rows("residual", residual), weight, as_rows("out", out), as_rows("residual_out", residual_out),
           float(eps), float(offset), block_n)
    return out, residual_out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(stat_dtype(x))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return h.to(dtype)
    if offset:
        return (h * (offset + weight.to(h.dtype))).to(dtype)
    return (weight * h.to(dtype)).to(dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                           eps: float = 1e-6, inplace: bool = False,
                           offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_ref(lambda h: rms_norm_ref(h, weight, eps, offset), x, residual, inplace)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
                 offset: float = 0.0) -> torch.Tensor:
    """fp32 off CUDA: packserve's C kernel (one pass), else torch's rms_norm (same math and, for fp32, the
    same order of operations as the reference). Other dtypes keep the reference's explicit fp32 statistics."""
    if x.dtype != torch.float32:
        return rms_norm_ref(x, weight, eps, offset)
    if cpu_ops.usable(x):
        return cpu_ops.rms_norm(x, weight, eps, offset)
    if weight is not None and offset:
        weight = offset + weight
    return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    if use_triton(x):
        return torch.ops.packserve_triton.rms_norm(x, weight, eps, offset)
    return rms_norm_cpu(x, weight, eps, offset)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
                       inplace: bool = False, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        if inplace:
            return fused_add_rms_norm_triton(x, residual, weight, eps, inplace, offset)
        return torch.ops.packserve_triton.add_rms_norm(x, residual, weight, eps, offset)
    if not inplace and cpu_ops.usable(x, residual):
        return cpu_ops.rms_norm(x, weight, eps, offset, residual=residual)
    return fused_add_ref(lambda h: rms_norm_cpu(h, weight, eps, offset), x, residual, inplace)


triton_ops.register("rms_norm(Tensor x, Tensor? weight, float eps, float offset) -> Tensor",
                    lambda x, w, eps, offset: rms_norm_triton(x, w, eps, offset), triton_ops.fake_like)
triton_ops.register("add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps, float offset) "
                    "-> (Tensor, Tensor)",
                    lambda x, r, w, eps, offset: fused_add_rms_norm_triton(x, r, w, eps, False, offset),
                    triton_ops.fake_like_pair)
