"""Tensor-parallel state of this process: its rank, the group size, and the all-reduce of row-parallel layers.

Set once per process (`set_tensor_parallel`) before the model is built: the column/row linears and the attention
layers read it at construction to take their shard (Megatron-style: column-parallel QKV and gate/up, row-parallel
output and down projections with one all-reduce each). Collectives run on torch.distributed (gloo on CPU, NCCL on
CUDA) with a timeout, so a dead rank turns into an error rather than a hang.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch

_RANK, _SIZE = 0, 1
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# Seconds this process spent in collectives (all-reduces, step broadcasts), waiting for the other ranks included,
# and in its steps' forward passes (collectives included).
collective_seconds = 0.0
step_seconds = 0.0
# Rank 0: every rank's (step_seconds, collective_seconds) as of the last `gather_rank_seconds` (index = rank).
rank_seconds: list[tuple[float, float]] = []


def tp_rank() -> int:
    return _RANK


def tp_size() -> int:
    return _SIZE


def set_tensor_parallel(rank: int, size: int) -> None:
    global _RANK, _SIZE
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a group of {size}")
    _RANK, _SIZE = rank, size


def init_group(rank: int, size: int, init_method: str, device: torch.device) -> None:
    """Join the group (every rank calls it; it returns once all have) and set this process's TP state."""
    import torch.distributed as dist

    from packserve.config import ConfigError

    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        where = init_method if init_method != "env://" else \
            f"MASTER_ADDR/MASTER_PORT {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise ConfigError(f"tensor parallel rank 0 cannot listen on {where}: the port is in use") from None
    set_tensor_parallel(rank, size)


def destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    set_tensor_parallel(0, 1)
    global rank_seconds
    rank_seconds = []


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place (row-parallel layers' partial products)."""
    if _SIZE > 1:
        import torch.distributed as dist

        global collective_seconds
        t = time.perf_counter()
        dist.all_reduce(x)
        collective_seconds += time.perf_counter() - t
    return x


def gather_columns(local: torch.Tensor, width: int) -> torch.Tensor | None:
    """Concatenate every rank's column block on rank 0, trimmed to `width` columns; None on the other ranks."""
    import torch.distributed as dist

    global collective_seconds
    t = time.perf_counter()
    parts = [torch.empty_like(local) for _ in range(_SIZE)] if _RANK == 0 else None
    dist.gather(local, parts, dst=0)
    collective_seconds += time.perf_counter() - t
    return torch.cat(parts, dim=1)[:, :width] if _RANK == 0 else None


def gather_rank_seconds(device: torch.device) -> None:
    """Every rank calls it at the same point of a step: rank 0 collects the ranks' time counters (the per-rank
    metrics; workers have no other way to report)."""
    import torch.distributed as dist

    global rank_seconds
    local = torch.tensor([step_seconds, collective_seconds], dtype=torch.float64, device=device)
    parts = [torch.empty_like(local) for _ in range(_SIZE)] if _RANK == 0 else None
    dist.gather(local, parts, dst=0)
    if _RANK == 0:
        rank_seconds = [(float(p[0]), float(p[1])) for p in parts]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
