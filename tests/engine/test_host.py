"""Host-side tuning: glibc malloc keeps freed activation memory, and the engine thread owns torch's pool."""

import subprocess
import sys
import threading

import pytest

FAULTS = r"""
import resource, sys, torch
from packserve.host import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc() and tune_malloc()  # idempotent
def layer(x):  # the activation pattern of a decoder layer over 3000 tokens: 1.5 to 24 MB, overlapping lifetimes
    qkv = torch.empty(x.shape[0], 640).fill_(1.0)
    attn = torch.empty(x.shape[0], 384).fill_(1.0)
    del qkv
    gate_up = torch.empty(x.shape[0], 2048).fill_(1.0)
    act = torch.empty(x.shape[0], 1024).fill_(1.0)
    del gate_up
    return torch.empty(x.shape[0], 384).fill_(1.0)
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(3000, 384).fill_(1.0)
    for _ in range(6):
        x = layer(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step()  # the first step faults its memory in
print(faults_of_a_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_stops_refaulting_activations():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    untuned, tuned = faults("plain"), faults("tuned")
    assert untuned > 3000  # glibc mmaps the large blocks anew and the kernel faults them in again, page by page
    assert tuned < untuned / 3


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
