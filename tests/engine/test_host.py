"""Host-side tuning: glibc malloc keeps freed activation memory, and the engine thread owns torch's pool."""

import os
import subprocess
import sys
import threading

import pytest

PROBE = r"""
import ctypes, json, resource, sys
from packserve.host import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert tune_malloc() and tune_malloc()  # idempotent
SIZE = 16 * 2**20  # an activation-sized block (above glibc's initial 128 KiB mmap threshold, under 32 MiB)
blocks = libc.mallinfo2().hblks
p = libc.malloc(SIZE)
mmapped = libc.mallinfo2().hblks - blocks
libc.memset(p, 1, SIZE)
libc.free(p)
kept = libc.mallinfo2().arena >= SIZE  # freed memory still in the heap (not trimmed)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(SIZE)
libc.memset(p, 2, SIZE)  # the next step's activations: page faults unless the memory stayed mapped
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
libc.free(p)
print(json.dumps({"mmapped": mmapped, "kept": kept, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_keeps_activation_memory_mapped():
    import json

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain, tuned = probe("plain"), probe("tuned")
    # Stock glibc: the block is a fresh mmap, and the next one is faulted in again (16 MiB = 4096 pages).
    assert plain["mmapped"] == 1 and plain["faults"] > 2000
    # Tuned: from the heap, kept there after free, and reused without faults.
    assert tuned["mmapped"] == 0 and tuned["kept"] and tuned["faults"] < 100


def test_async_engine_builds_its_engine_in_the_loop_thread(checkpoint_factory):
    tiny_model = checkpoint_factory("llama")
    from packserve.engine.async_engine import AsyncEngine
    from packserve.engine.engine import LLMEngine, engine_config

    built_in = []

    def build():
        built_in.append(threading.current_thread().name)
        return LLMEngine(engine_config(tiny_model, device="cpu", dtype="float32", max_model_len=64))

    ae = AsyncEngine(factory=build, num_threads=1)
    ae.start()
    try:
        assert built_in == ["packserve-engine"] and ae.engine is not None and ae.alive
    finally:
        ae.stop()

    def broken():
        raise ValueError("bad option")

    bad = AsyncEngine(factory=broken)
    with pytest.raises(ValueError, match="bad option"):
        bad.start()
    assert not bad.alive
    with pytest.raises(ValueError, match="exactly one"):
        AsyncEngine()


@pytest.mark.parametrize("files,limit", [
    ({"cpu.max": "max 100000\n"}, None),                                   # v2, no limit
    ({"cpu.max": "150000 100000\n"}, 1.5),                                 # v2, limits: cpu: 1.5
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({}, None),                                                             # no cgroup files at all
])
def test_thread_budget_follows_the_cgroup_cpu_quota(tmp_path, files, limit):
    """A Kubernetes CPU limit of 1.5 on a many-core host: 2 threads, not one per host core."""
    from packserve.host import cgroup_cpu_limit, cpu_budget

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(str(tmp_path)) == limit
    cpus = len(os.sched_getaffinity(0))
    rounded_up = {None: cpus, 1.5: 2, 0.5: 1}[limit]  # a fractional quota still gets a thread for its fraction
    assert cpu_budget(str(tmp_path)) == min(cpus, rounded_up)
