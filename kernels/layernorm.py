"""LayerNorm and residual-add + LayerNorm: Triton kernels, host wrappers, pure-torch references.

Semantics match torch.nn.functional.layer_norm for half inputs: mean, variance (biased,
two-pass: sum((x - mean)^2) / n, no E[x^2] - mean^2 cancellation) and the affine in fp32,
one cast to the input dtype at the end. weight/bias may be None.

The fused variant returns (layer_norm(x + residual), x + residual), with the sum rounded to
the input dtype first (an eager add followed by layer_norm).

`layer_norm` / `fused_add_layer_norm` dispatch: Triton on CUDA tensors, the reference elsewhere
(the references compute in fp32; fp64 inputs stay fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from packserve.kernels import triton_ops
from packserve.kernels.norm_utils import (as_rows, check_out, check_param, check_same, fused_add_ref, fused_outputs,
                                          launch_config, load_row_input, stat_dtype, use_triton)


@triton.jit
def _affine_store(y_ptrs, w_ptrs, b_ptrs, xn, mask, col_ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = xn
    if HAS_WEIGHT:
        y = y * tl.load(w_ptrs, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_kernel(X, R, W, B, Y, RO, n_rows, n_cols, stride_x, stride_r, stride_y, stride_ro, eps,
                       HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    row_ok = rows < n_rows
    x_row, r_row, y_row, ro_row = X + rows * stride_x, R + rows * stride_r, Y + rows * stride_y, RO + rows * stride_ro
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)[None, :]
        col_ok = cols < n_cols
        mask = row_ok & col_ok
        x = load_row_input(x_row + cols, r_row + cols, ro_row + cols, mask, HAS_RESIDUAL)
        mean = tl.sum(x, axis=1)[:, None] / n_cols
        xc = tl.where(mask, x - mean, 0.0)  # padding columns must not add (0 - mean)^2
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1)[:, None] / n_cols + eps)
        _affine_store(y_row + cols, W + cols, B + cols, xc * rstd, mask, col_ok, HAS_WEIGHT, HAS_BIAS)
    else:
        # Wide rows: pass 1 sums (and writes the new residual), pass 2 the centred squares, pass 3 writes.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            mask = row_ok & (cols < n_cols)
            acc += load_row_input(x_row + cols, r_row + cols, ro_row + cols, mask, HAS_RESIDUAL)
        mean = tl.sum(acc, axis=1)[:, None] / n_cols
        if HAS_RESIDUAL:
            # Later passes re-read the rounded sums (the inputs may be overwritten when in place).
            tl.debug_barrier()
            x_row = ro_row
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            mask = row_ok & (cols < n_cols)
            xc = tl.where(mask, tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += xc * xc
        rstd = tl.rsqrt(tl.sum(acc, axis=1)[:, None] / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            col_ok = cols < n_cols
            mask = row_ok & col_ok
            xc = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) - mean
            _affine_store(y_row + cols, W + cols, B + cols, xc * rstd, mask, col_ok, HAS_WEIGHT, HAS_BIAS)


def _launch(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
            y2: torch.Tensor, ro2: torch.Tensor | None, eps: float, block_n: int | None) -> None:
    rows, width = x2.shape
    if rows == 0:
        return
    block_m, block_n, num_warps, single = launch_config(rows, width, block_n)
    has_residual = r2 is not None
    # Unused pointer slots get a valid tensor; the constexpr flags keep them untouched.
    r2 = x2 if r2 is None else r2
    ro2 = y2 if ro2 is None else ro2
    grid = (triton.cdiv(rows, block_m),)
    _layer_norm_kernel[grid](
        x2, r2, x2 if weight is None else weight, x2 if bias is None else bias, y2, ro2, rows, width,
        x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0), eps,
        HAS_RESIDUAL=has_residual, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=num_warps)


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
                      out: torch.Tensor | None = None, block_n: int | None = None) -> torch.Tensor:
    x2 = as_rows("x", x, copy_ok=True)
    check_param("weight", weight, x.shape[-1], x.device)
    check_param("bias", bias, x.shape[-1], x.device)
    check_out("out", out, x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _launch(x2, None, weight, bias, as_rows("out", out), None, float(eps), block_n)
    return out


def fused_add_layer_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                                bias: torch.Tensor | None, eps: float = 1e-5, inplace: bool = False,
                                out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                                block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual). inplace: the output goes to x, the new residual to residual."""
    x2 = as_rows("x", x)
    check_same("residual", residual, x)
    check_param("weight", weight, x.shape[-1], x.device)
    check_param("bias", bias, x.shape[-1], x.device)
    out, residual_out = fused_outputs(x, residual, out, residual_out, inplace)
    _launch(x2, as_rows("residual", residual), weight, bias, as_rows("out", out),
            as_rows("residual_out", residual_out), float(eps), block_n)
    return out, residual_out


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5) -> torch.Tensor:
    ct = stat_dtype(x)
    w = None if weight is None else weight.to(ct)
    b = None if bias is None else bias.to(ct)
    return F.layer_norm(x.to(ct), (x.shape[-1],), w, b, eps).to(x.dtype)


def fused_add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float = 1e-5,
                             inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_ref(lambda h: layer_norm_ref(h, weight, bias, eps), x, residual, inplace)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    if use_triton(x):
        return torch.ops.packserve_triton.layer_norm(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)


def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, eps: float = 1e-5,
                         inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        if inplace:
            return fused_add_layer_norm_triton(x, residual, weight, bias, eps, inplace)
        return torch.ops.packserve_triton.add_layer_norm(x, residual, weight, bias, eps)
    return fused_add_layer_norm_ref(x, residual, weight, bias, eps, inplace)


triton_ops.register("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor",
                    lambda x, w, b, eps: layer_norm_triton(x, w, b, eps), triton_ops.fake_like)
triton_ops.register("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) "
                    "-> (Tensor, Tensor)",
                    lambda x, r, w, b, eps: fused_add_layer_norm_triton(x, r, w, b, eps, False), triton_ops.fake_like_pair)
