"""Compressed RMSNorm (CRMSNorm, Jiang et al. 2023): host wrappers over the RMSNorm Triton kernel in its compressed
mode (packserve.kernels.rmsnorm), and the pure-torch reference.

x holds the first d-1 coordinates of a zero-mean vector z of width d (the dropped one is
z_d = -sum(x)), so with n = d - 1 = x.shape[-1]:
    mean(z^2) = (sum(x^2) + sum(x)^2) / d
    y = x * rsqrt(mean(z^2) + eps)            (the d-1 kept coordinates of RMSNorm(z))
Statistics in fp32; with a weight, Llama semantics (cast to the input dtype, then multiply).
The readers of y carry the dropped coordinate folded into their weights
(packserve.models.norm_conversion). `full_width` (default n + 1) lets the d-1 coordinates
be stored zero-padded to an aligned width: zeros add nothing to either sum.

`crms_norm` / `fused_add_crms_norm` dispatch: Triton on CUDA tensors, the reference elsewhere
(the references compute in fp32; fp64 inputs stay fp64).
"""

from __future__ import annotations

import torch

from packserve.kernels import triton_ops
from packserve.kernels.norm_utils import (as_rows, check_out, check_param, check_same, fused_add_ref, fused_outputs,
                                          stat_dtype, use_triton)
from packserve.kernels.rmsnorm import launch as rms_launch


def _full_width(width: int, full_width: int | None) -> int:
    """d: x.shape[-1] + 1 unless the d-1 coordinates are stored zero-padded to a wider, aligned width."""
    if full_width is None:
        return width + 1
    if full_width < 2:
        raise ValueError(f"full_width must be >= 2, got {full_width}")
    return int(full_width)


def _launch(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor | None, y2: torch.Tensor,
            ro2: torch.Tensor | None, eps: float, full_width: int | None, block_n: int | None) -> None:
    """The RMSNorm kernel in its compressed mode (packserve.kernels.rmsnorm)."""
    rms_launch(x2, r2, weight, y2, ro2, eps, 0.0, block_n, compressed_width=_full_width(x2.shape[1], full_width))


def crms_norm_triton(x: torch.Tensor, eps: float = 1e-5, weight: torch.Tensor | None = None,
                     full_width: int | None = None, out: torch.Tensor | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    x2 = as_rows("x", x, copy_ok=True)
    check_param("weight", weight, x.shape[-1], x.device)
    check_out("out", out, x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _launch(x2, None, weight, as_rows("out", out), None, float(eps), full_width, block_n)
    return out


def fused_add_crms_norm_triton(x: torch.Tensor, residual: torch.Tensor, eps: float = 1e-5,
                               weight: torch.Tensor | None = None, inplace: bool = False,
                               full_width: int | None = None,
                               out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                               block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(crms_norm(x + residual), x + residual). inplace: the output goes to x, the new residual to residual."""
    x2 = as_rows("x", x)
    check_same("residual", residual, x)
    check_param("weight", weight, x.shape[-1], x.device)
    out, residual_out = fused_outputs(x, residual, out, residual_out, inplace)
    _launch(x2, as_rows("residual", residual), weight, as_rows("out", out), as_rows("residual_out", residual_out),
            float(eps), full_width, block_n)
    return out, residual_out


def crms_norm_ref(x: torch.Tensor, eps: float = 1e-5, weight: torch.Tensor | None = None,
                  full_width: int | None = None) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(stat_dtype(x))
    d = _full_width(x.shape[-1], full_width)
    mean_sq = (h.pow(2).sum(-1, keepdim=True) + h.sum(-1, keepdim=True).pow(2)) / d
    h = (h * torch.rsqrt(mean_sq + eps)).to(dtype)
    return h if weight is None else (weight * h).to(dtype)


def fused_add_crms_norm_ref(x: torch.Tensor, residual: torch.Tensor, eps: float = 1e-5,
                            weight: torch.Tensor | None = None, inplace: bool = False,
                            full_width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_ref(lambda h: crms_norm_ref(h, eps, weight, full_width), x, residual, inplace)


def crms_norm(x: torch.Tensor, eps: float = 1e-5, weight: torch.Tensor | None = None,
              full_width: int | None = None) -> torch.Tensor:
    if use_triton(x):
        return torch.ops.packserve_triton.crms_norm(x, eps, weight, full_width)
    return crms_norm_ref(x, eps, weight, full_width)


def fused_add_crms_norm(x: torch.Tensor, residual: torch.Tensor, eps: float = 1e-5,
                        weight: torch.Tensor | None = None, inplace: bool = False,
                        full_width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        if inplace:
            return fused_add_crms_norm_triton(x, residual, eps, weight, inplace, full_width)
        return torch.ops.packserve_triton.add_crms_norm(x, residual, eps, weight, full_width)
    return fused_add_crms_norm_ref(x, residual, eps, weight, inplace, full_width)


triton_ops.register("crms_norm(Tensor x, float eps, Tensor? weight, int? full_width) -> Tensor",
                    lambda x, eps, w, fw: crms_norm_triton(x, eps, w, fw), triton_ops.fake_like)
triton_ops.register("add_crms_norm(Tensor x, Tensor residual, float eps, Tensor? weight, int? full_width) "
                    "-> (Tensor, Tensor)",
                    lambda x, r, eps, w, fw: fused_add_crms_norm_triton(x, r, eps, w, False, fw), triton_ops.fake_like_pair)
