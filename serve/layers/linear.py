"""Linear layers written for a later tensor-parallel split.

Column layers split their output features across ranks, row layers their input
features (followed by an all-reduce). With tp_size == 1 they are plain linears;
the weight loaders already take each rank's shard so adding TP later only means
setting tp_rank/tp_size and inserting the all-reduce.
"""

from __future__ import annotations

import logging
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from packserve.kernels import cpu_ops

log = logging.getLogger(__name__)

# Decode-sized inputs (at most this many rows) use the prepacked weight on CPU; longer inputs (prefill) keep
# MKL's sgemm, which is as fast there and matches transformers' own CPU results bit for bit.
PACKED_MAX_ROWS = 256

CpuPacked = Union[cpu_ops.PanelWeight, torch.Tensor]  # packserve's panels, or oneDNN's blocked layout


def pack_for_cpu(weight: torch.Tensor, bias: torch.Tensor | None = None) -> CpuPacked | None:
    """A prepacked copy of an fp32 CPU weight [out, in] for decode-sized inputs, or None where unsupported.

    A decode step multiplies a few rows by every weight of the model once, so it is bound by streaming the
    weights. With the C kernels (packserve.kernels.cpu_ops) the copy is in 32-feature panels for
    `linear_packed`, which prefetches the next panel while it multiplies one; without them (no compiler) it is
    oneDNN's blocked layout, read in the order its GEMM consumes it. BENCHMARKS.md has the decode-step
    figures. The price is a second copy of the weights in memory (the originals stay: prefill and the embedding
    use them)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    if cpu_ops.available():
        return cpu_ops.pack_linear(weight, bias)
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32)
    except (AttributeError, RuntimeError) as exc:  # a torch build without oneDNN's linear ops
        log.debug("no oneDNN weight prepacking: %s", exc)
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: CpuPacked | None = None) -> torch.Tensor:
    """F.linear, through the prepacked weight for decode-sized CPU inputs when there is one (a PanelWeight
    carries its own copy of the bias)."""
    if packed is not None and x.dim() == 2 and x.shape[0] <= PACKED_MAX_ROWS and x.stride(-1) == 1:
        if isinstance(packed, cpu_ops.PanelWeight):
            if x.shape[0] <= 1 or x.stride(0) >= x.shape[1]:  # a row layout (not e.g. an expanded view)
                return cpu_ops.linear_packed(x, packed)
            return F.linear(x, weight, bias)
        if x.is_contiguous():
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class ColumnLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if out_features % tp_size:
            raise ValueError(f"out_features {out_features} not divisible by tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features, self.out_features = in_features, out_features // tp_size
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.packed: CpuPacked | None = None  # set by prepack_cpu (a plain attribute: not in state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)

    def _shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        size = full.shape[dim] // self.tp_size
        return full.narrow(dim, self.tp_rank * size, size)

    def load(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        """name: 'weight' or 'bias'; tensor in nn.Linear layout [out, in]."""
        param = getattr(self, name)
        param.data.copy_(self._shard(tensor, 0))


class MergedColumnLinear(ColumnLinear):
    """Several column linears with the same input, fused into one matmul (e.g. gate+up, q+k+v)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__(in_features, sum(shard_sizes.values()), bias, tp_rank, tp_size)
        self.shard_sizes = {k: v // tp_size for k, v in shard_sizes.items()}
        offsets, off = {}, 0
        for k, v in self.shard_sizes.items():
            offsets[k] = off
            off += v
        self.shard_offsets = offsets

    def load(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        param = getattr(self, name)
        if shard is None:  # already fused in the checkpoint
            param.data.copy_(tensor)
            return
        size = self.shard_sizes[shard]
        part = tensor.narrow(0, self.tp_rank * size, size)
        param.data.narrow(0, self.shard_offsets[shard], size).copy_(part)


class RowLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if in_features % tp_size:
            raise ValueError(f"in_features {in_features} not divisible by tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features, self.out_features = in_features // tp_size, out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features), requires_grad=False)
        # Only rank 0 adds the bias so the all-reduce sums it once.
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: CpuPacked | None = None  # set by prepack_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias if self.tp_rank == 0 else None, self.packed)
        return out  # + all_reduce when tp_size > 1

    def load(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        param = getattr(self, name)
        if name == "weight":
            size = self.in_features
            tensor = tensor.narrow(1, self.tp_rank * size, size)
        param.data.copy_(tensor)


def prepack_cpu(model: nn.Module) -> int:
    """Give every Column/Row linear of a loaded CPU fp32 model its prepacked weight (and the model's tied LM
    head, through its `prepack_lm_head` hook). Returns how many weights were packed."""
    n = 0
    for m in model.modules():
        if isinstance(m, (ColumnLinear, RowLinear)):
            bias = m.bias if isinstance(m, ColumnLinear) or m.tp_rank == 0 else None  # as in forward()
            m.packed = pack_for_cpu(m.weight, bias)
            n += m.packed is not None
    hook = getattr(model, "prepack_lm_head", None)
    if hook is not None:
        n += bool(hook())
    return n
