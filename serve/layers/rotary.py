"""Rotary position embeddings (rotate-half layout, as Llama/Mistral/Qwen checkpoints use)."""

from __future__ import annotations

import math

import torch
from torch import nn

from packserve.kernels import cpu_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def rope_inv_freq(head_dim: int, rope: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp64 -> fp32) and the attention scaling for a rope config dict."""
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    theta = float(rope.get("rope_theta", 10000.0))
    partial = float(rope.get("partial_rotary_factor", 1.0))
    dim = int(head_dim * partial)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope_type in ("default", "dynamic"):
        # dynamic NTK only changes frequencies beyond the original context; we cap the context instead.
        return inv.float(), 1.0
    if rope_type == "linear":
        return (inv / float(rope["factor"])).float(), 1.0
    if rope_type == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float(), 1.0
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: dict):
        super().__init__()
        inv, scale = rope_inv_freq(head_dim, rope)
        self.rot_dim = inv.numel() * 2
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        # Plain attributes, not buffers: model.to(bfloat16) must not round the tables.
        self.cos = freqs.cos() * scale
        self.sin = freqs.sin() * scale

    def place(self, device: torch.device) -> None:
        """Move the tables (the loader does it with the weights, so the KV cache is sized after them)."""
        if self.cos.device != device:
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)

    def _follow(self, device: torch.device) -> None:
        """The tables live on the device of the positions they are indexed with."""
        self.place(device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows of `positions`: [T, 1, rot_dim / 2] each."""
        self._follow(positions.device)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D]; positions: [T]."""
        cos, sin = self.tables(positions)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def rotate_(self, positions: torch.Tensor, x: torch.Tensor) -> None:
        """In place on x: [T, heads, D] (may be a strided view, e.g. the q and k columns of a fused QKV output, so
        q and k turn in one pass). fp32 only: other dtypes round the products differently; use forward."""
        assert x.dtype == torch.float32
        if cpu_ops.usable(x):
            self._follow(positions.device)
            cpu_ops.rotary_(x, positions, self.cos, self.sin)
            return
        cos, sin = self.tables(positions)
        half = self.rot_dim // 2
        x1, x2 = x[..., :half], x[..., half:self.rot_dim]
        x1_sin, x2_sin = x1 * sin, x2 * sin
        x1.mul_(cos).sub_(x2_sin)  # x1 cos - x2 sin
        x2.mul_(cos).add_(x1_sin)  # x2 cos + x1 sin

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim:]
        x1, x2 = rot.float().chunk(2, dim=-1)
        c, s = cos.to(torch.float32), sin.to(torch.float32)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.numel() else out
