"""Linear layers with a tensor-parallel split (packserve.distributed).

Column layers split their output features across ranks, row layers their input
features (followed by an all-reduce). With one rank they are plain linears. The
rank and group size come from the process's TP state unless given; the weight
loaders take each rank's shard of the checkpoint tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from packserve import distributed
from packserve.kernels import cpu_ops
from packserve.layers.cpu_gemm import HEAD_ROWS, Calibration, CpuPackedLinear, pack


def whole(t) -> torch.Tensor:
    """A checkpoint tensor read whole if it is still lazy (packserve.models.loader.LazyTensor)."""
    return t if isinstance(t, torch.Tensor) else t.load()


def _tp(rank: int | None, size: int | None) -> tuple[int, int]:
    return (distributed.tp_rank() if rank is None else rank), (distributed.tp_size() if size is None else size)


# Off while oneDNN's bf16 mode is on (packserve.engine.precision): the panel GEMM is exact fp32 and was calibrated
# against exact fp32 F.linear, not against the faster rounded one.
_panels_on = True


def use_panels(on: bool) -> None:
    global _panels_on
    _panels_on = on


def _panel_kernel(x: torch.Tensor, packed: CpuPackedLinear | None) -> str | None:
    """The panel kernel calibrated for x's row count, if x can use one (CPU rows with contiguous features)."""
    if (packed is not None and _panels_on and x.dim() == 2 and x.stride(-1) == 1
            and (x.shape[0] <= 1 or x.stride(0) >= x.shape[1]) and cpu_ops.available()):  # a row layout
        return packed.kernel(x.shape[0])
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: CpuPackedLinear | None = None) -> torch.Tensor:
    """F.linear, or a panel kernel for CPU inputs of the row counts where it measured faster (the panels carry
    their own copy of the bias; packserve.layers.cpu_gemm)."""
    kernel = _panel_kernel(x, packed)
    if kernel is not None:
        if kernel == "panel":
            return cpu_ops.linear_packed(x, packed.panels)
        if kernel == "brgemm":
            return cpu_ops.linear_brgemm(x, packed.panels)
    return F.linear(x, weight, bias)


def fuses_silu_mul(layer: "MergedColumnLinear", x: torch.Tensor) -> bool:
    """Whether silu(gate) * up of this fused gate_up layer runs in one pass on x (cpu_ops.linear_brgemm_silu_mul):
    a layer of gate then up halves (multiples of 32), where the brgemm kernel serves x's row count (the [rows, 2I]
    product then never reaches memory)."""
    return (tuple(layer.shard_sizes) == ("gate", "up") and layer.out_features % 64 == 0
            and _panel_kernel(x, layer.packed) == "brgemm")


class ColumnLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int | None = None,
                 tp_size: int | None = None):
        super().__init__()
        tp_rank, tp_size = _tp(tp_rank, tp_size)
        if out_features % tp_size:
            raise ValueError(f"out_features {out_features} not divisible by tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features, self.out_features = in_features, out_features // tp_size
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.packed: CpuPackedLinear | None = None  # set by prepack_cpu (a plain attribute: not in state_dict)

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
    """Several column linears with the same input, fused into one matmul (e.g. gate+up, q+k+v). `replicas[k]`:
    shard k is split into tp_size / replicas[k] parts, each held by that many consecutive ranks (KV heads fewer
    than the ranks are replicated)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None, replicas: dict[str, int] | None = None):
        tp_rank, tp_size = _tp(tp_rank, tp_size)
        self.replicas = {k: (replicas or {}).get(k, 1) for k in shard_sizes}
        local = {}
        for k, v in shard_sizes.items():
            parts = tp_size // self.replicas[k]
            if tp_size % self.replicas[k] or v % parts:
                raise ValueError(f"shard {k!r} ({v}) does not split over {tp_size} ranks")
            local[k] = v // parts
        super().__init__(in_features, sum(local.values()) * tp_size, bias, tp_rank, tp_size)
        self.shard_sizes = local
        self.full_sizes = dict(shard_sizes)
        offsets, off = {}, 0
        for k, v in self.shard_sizes.items():
            offsets[k] = off
            off += v
        self.shard_offsets = offsets

    def load(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        param = getattr(self, name)
        if shard is None:  # already fused in the checkpoint: each part's slice of this rank
            if self.tp_size == 1:
                param.data.copy_(whole(tensor))
                return
            tensor, start = whole(tensor), 0
            for k, full in self.full_sizes.items():
                self.load(name, tensor.narrow(0, start, full), k)
                start += full
            return
        size = self.shard_sizes[shard]
        part = tensor.narrow(0, (self.tp_rank // self.replicas[shard]) * size, size)
        param.data.narrow(0, self.shard_offsets[shard], size).copy_(part)


class RowLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int | None = None,
                 tp_size: int | None = None):
        super().__init__()
        tp_rank, tp_size = _tp(tp_rank, tp_size)
        if in_features % tp_size:
            raise ValueError(f"in_features {in_features} not divisible by tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features, self.out_features = in_features // tp_size, out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features), requires_grad=False)
        # Only rank 0 adds the bias so the all-reduce sums it once.
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: CpuPackedLinear | None = None  # set by prepack_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias if self.tp_rank == 0 else None, self.packed)
        return distributed.all_reduce(out) if self.tp_size > 1 else out

    def load(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        param = getattr(self, name)
        if name == "weight":
            size = self.in_features
            tensor = tensor.narrow(1, self.tp_rank * size, size)
        param.data.copy_(whole(tensor))


def prepack_cpu(model: nn.Module) -> int:
    """Give every Column/Row linear of a loaded CPU fp32 model (and the model's tied LM head, through its
    `prepack_lm_head` hook) a panel-packed copy where the panel GEMM measured faster than torch's on this machine
    (layers.cpu_gemm). Needs the C kernels loaded; returns how many weights were packed."""
    from packserve.layers.vocab import ParallelLMHead  # (vocab builds on this module)

    if not cpu_ops.available():
        return 0
    calibration = Calibration()
    n = 0
    for m in model.modules():
        if isinstance(m, (ColumnLinear, RowLinear)):
            bias = m.bias if isinstance(m, ColumnLinear) or m.tp_rank == 0 else None  # as in forward()
            m.packed = pack(m.weight, bias, calibration, HEAD_ROWS if isinstance(m, ParallelLMHead) else None)
            n += m.packed is not None
    hook = getattr(model, "prepack_lm_head", None)
    if hook is not None:
        n += bool(hook(calibration))
    calibration.save()
    model.cpu_prepacked = True
    return n
