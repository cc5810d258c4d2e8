"""Host (CPU-side) tuning the engine applies at start-up.

glibc malloc serves every allocation above a dynamic threshold (128 KiB at first, at most 32 MiB) with a
fresh mmap, and returns freed heap tops to the kernel. A CPU forward allocates and frees tens of MB of
activations per layer, so every step would page-fault its activations in again: on the 2-core benchmark
machine that was ~150k minor faults and half a second of kernel time per 6k-token prefill. Pinning the
mmap threshold at its maximum and never trimming keeps freed activation memory in the heap for the next
step, as jemalloc/tcmalloc would (the price: the process keeps its peak heap resident). Allocations above
32 MiB still use mmap, so the model layers keep large per-step temporaries under that size (the MLP runs in
token chunks on CPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)

_applied = False


def tune_malloc() -> bool:
    """Apply the glibc settings above once per process; False where they do not apply (not glibc)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = ok
    log.info("glibc malloc tuned for steady-state reuse: %s", "yes" if ok else "refused")
    return ok


def _own_cgroup(controller: str | None) -> str:
    """This process's cgroup path for a v1 controller (None: the v2 unified hierarchy), from /proc/self/cgroup;
    "/" inside a container with its own cgroup namespace."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, names, path = line.rstrip("\n").split(":", 2)
                if (controller is None and names == "") or (controller is not None and controller in names.split(",")):
                    return path
    except (OSError, ValueError):
        pass
    return "/"


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (a Kubernetes CPU limit, `docker run --cpus`), or None.
    cgroup v2 (`cpu.max`: "quota period" or "max period") and v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`), in
    this process's own cgroup, else at the root of the mount (a container's view)."""
    for base in dict.fromkeys((f"{root}{_own_cgroup(None)}".rstrip("/"), root)):
        try:
            quota, period = open(f"{base}/cpu.max").read().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            pass
    for base in dict.fromkeys((f"{root}/cpu{_own_cgroup('cpu')}".rstrip("/"), f"{root}/cpu")):
        try:
            quota_us = int(open(f"{base}/cpu.cfs_quota_us").read())
            period_us = int(open(f"{base}/cpu.cfs_period_us").read())
            return quota_us / period_us if quota_us > 0 and period_us > 0 else None
        except (OSError, ValueError):
            pass
    return None


def cpu_budget(root: str = "/sys/fs/cgroup") -> int:
    """Threads the engine should run: the CPUs this process may use, capped by its cgroup quota (rounded up).
    torch's default counts the host's cores: under a 2-CPU limit on a 64-core host its 64 OpenMP threads would be
    throttled every period, and each parallel region waits for its slowest, descheduled thread."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    return max(1, min(cpus, math.ceil(limit - 1e-9))) if limit else max(1, cpus)


def trim_heap() -> bool:
    """Give freed heap memory back to the kernel now (glibc malloc_trim), e.g. after tokenizing a huge prompt:
    with the tuning above nothing else ever would. False where it does not apply."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
