"""Norm layers. On CUDA they call the fused Triton kernels in packserve.kernels;
on CPU (and if the kernels are unavailable) they run the pure-torch math."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _kernel(module: str, name: str):
    try:
        mod = __import__(f"packserve.kernels.{module}", fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError):
        return None


class RMSNorm(nn.Module):
    """Llama semantics: fp32 statistics, cast back, then multiply by (offset + weight)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight + self.offset) * h.to(dtype) if self.offset else self.weight * h.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`: returns (norm(x + residual), x + residual)."""
        if x.is_cuda:
            if residual is None:
                fn = _kernel("rmsnorm", "rms_norm")
                if fn is not None:
                    return fn(x, self.weight, self.eps, offset=self.offset)
            elif self.offset == 0.0:
                fn = _kernel("rmsnorm", "fused_add_rms_norm")
                if fn is not None:
                    return fn(x, residual, self.weight, self.eps)
        if residual is None:
            return self._torch(x)
        residual = x + residual
        return self._torch(residual), residual


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            residual = x + residual
            return self.forward(residual), residual
        if x.is_cuda:
            fn = _kernel("layernorm", "layer_norm")
            if fn is not None:
                return fn(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class PlainRMSNorm(nn.Module):
    """RMSNorm without a gain (the gain is folded into the readers): Pre-RMSNorm form."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            residual = x + residual
            return self.forward(residual), residual
        if x.is_cuda:
            fn = _kernel("rmsnorm", "rms_norm")
            if fn is not None:
                return fn(x, torch.ones(x.shape[-1], device=x.device, dtype=x.dtype), self.eps)
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class CRMSNorm(nn.Module):
    """Compressed RMSNorm: x holds d-1 coordinates of a zero-mean vector of width d."""

    def __init__(self, full_dim: int, eps: float = 1e-5):
        super().__init__()
        self.full_dim, self.eps = full_dim, eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            residual = x + residual
            return self.forward(residual), residual
        if x.is_cuda:
            fn = _kernel("crmsnorm", "crms_norm")
            if fn is not None:
                return fn(x, self.eps)
        h = x.float()
        ms = (h.pow(2).sum(-1, keepdim=True) + h.sum(-1, keepdim=True).pow(2)) / self.full_dim
        return (h * torch.rsqrt(ms + self.eps)).to(x.dtype)
