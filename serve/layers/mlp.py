from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from packserve.kernels import cpu_ops
from packserve.layers.linear import ColumnLinear, MergedColumnLinear, RowLinear, fuses_silu_mul

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


INPLACE = (F.silu, F.relu)  # activations with an inplace= flag


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnLinear(hidden, {"gate": intermediate, "up": intermediate}, bias=bias)
        self.down_proj = RowLinear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    # On CPU, a long step runs in chunks of this many tokens: the [tokens, 2 x intermediate] temporaries then
    # stay cache-sized and under glibc's mmap threshold (packserve.host) instead of being page-faulted in anew.
    cpu_chunk = 1024
    # With silu * up fused into the gate_up kernel only [tokens, intermediate] is materialized: chunks of up to
    # this many elements of it (the serving model's 5,906-token prefill in one piece: no concatenation).
    fused_chunk_elems = 16 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] > self.cpu_chunk:
            chunk = self.cpu_chunk
            if self._fuses_silu(x):
                chunk = max(chunk, self.fused_chunk_elems // self.down_proj.in_features)
            if x.shape[0] > chunk:
                return torch.cat([self._forward(c) for c in x.split(chunk)])
        return self._forward(x)

    def _fuses_silu(self, x: torch.Tensor) -> bool:
        return self.act is F.silu and fuses_silu_mul(self.gate_up_proj, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fuses_silu(x):
            return self.down_proj(cpu_ops.linear_brgemm_silu_mul(x, self.gate_up_proj.packed.panels))
        gate_up = self.gate_up_proj(x)
        if self.act is F.silu and gate_up.dim() == 2 and cpu_ops.usable(gate_up):
            return self.down_proj(cpu_ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        # The activation in place on a contiguous copy: on CPU a strided elementwise op is ~2x slower.
        h = gate.contiguous()
        h = self.act(h, inplace=True) if self.act in INPLACE else self.act(h)
        return self.down_proj(h.mul_(up))


class PlainMLP(nn.Module):
    """proj(act(fc(x))) (GPT-2)."""

    def __init__(self, hidden: int, intermediate: int, act: str, out_features: int | None = None):
        super().__init__()
        self.c_fc = ColumnLinear(hidden, intermediate, bias=True)
        self.c_proj = RowLinear(intermediate, out_features or hidden, bias=True)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))
