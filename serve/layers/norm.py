"""Norm layers over the fused kernels in packserve.kernels.

The kernel dispatchers pick the Triton kernel for CUDA tensors and the pure-torch
reference elsewhere, so the layers call them unconditionally. With `residual`, a
layer returns (norm(x + residual), x + residual) in one pass over the hidden state.
"""

from __future__ import annotations

import torch
from torch import nn

from packserve.kernels.crmsnorm import crms_norm, fused_add_crms_norm
from packserve.kernels.layernorm import fused_add_layer_norm, layer_norm
from packserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """Llama semantics: fp32 statistics, cast back, then multiply by (offset + weight)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps, offset=self.offset)
        return fused_add_rms_norm(x, residual, self.weight, self.eps, offset=self.offset)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class PlainRMSNorm(nn.Module):
    """RMSNorm without a gain (the gain is folded into the readers): the Pre-RMSNorm form."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, None, self.eps)
        return fused_add_rms_norm(x, residual, None, self.eps)


class CRMSNorm(nn.Module):
    """Compressed RMSNorm: x holds d-1 coordinates of a zero-mean vector of width d."""

    def __init__(self, full_dim: int, eps: float = 1e-5):
        super().__init__()
        self.full_dim, self.eps = full_dim, eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return crms_norm(x, self.eps, full_width=self.full_dim)
        return fused_add_crms_norm(x, residual, self.eps, full_width=self.full_dim)
