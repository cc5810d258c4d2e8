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
