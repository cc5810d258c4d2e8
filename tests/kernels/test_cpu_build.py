"""Building and loading the C kernels: per-ISA builds, a server that never waits on the compiler, a compiler
timeout that kills the whole compiler process group, failed builds remembered, and torch paths throughout."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from packserve.kernels import cpu_lib

pytestmark = pytest.mark.skipif(not cpu_lib.supported_isas(), reason="needs an x86-64 CPU with AVX2")

GENERATE = r"""
import json, sys, time, logging
logging.basicConfig(level=logging.INFO)
from packserve import LLM, SamplingParams
from packserve.kernels import cpu_lib
prompts = [[5, 6, 7], list(range(10, 90))]
params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
t = time.monotonic()
llm = LLM(sys.argv[1], device="cpu")
first = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
first_s, kernel_then = time.monotonic() - t, llm.engine.runner.decode_kernel
ok = cpu_lib.wait()
second = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
print(json.dumps({"first_s": first_s, "kernel_then": kernel_then, "available": ok, "isa": cpu_lib.loaded_isa(),
                  "kernel_now": llm.engine.runner.decode_kernel, "first": first, "second": second}))
"""


def _run(script: str, *args: str, env: dict) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _slow_compiler(tmp_path, seconds: float) -> str:
    """A C++ compiler wrapper that sleeps first, as a loaded machine's first build does."""
    cc = tmp_path / "slow-c++"
    cc.write_text(f"#!/bin/sh\nsleep {seconds}\nexec c++ \"$@\"\n")
    cc.chmod(0o755)
    return str(cc)


def _want_tokens(path):
    from packserve import LLM, SamplingParams

    out = LLM(path, device="cpu").generate([[5, 6, 7], list(range(10, 90))],
                                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in out]


def test_engine_serves_on_torch_paths_while_the_kernels_build_then_switches(tmp_path, checkpoint_factory):
    """An empty cache and a compiler that takes 8 s: the engine generates at once on the torch paths (no wait on
    the compiler), and after the background build the same engine runs the C decode kernel; the greedy tokens
    are the same before, after, and in this (already built) process."""
    path = checkpoint_factory("llama")
    got, log = _run(GENERATE, path, env={"CXX": _slow_compiler(tmp_path, 8), "PACKSERVE_CACHE_DIR": str(tmp_path)})
    assert got["kernel_then"] is None and got["first_s"] < 8
    assert got["available"] and got["kernel_now"] == "cpu" and got["isa"] == cpu_lib.supported_isas()[0]
    assert "in the background" in log
    want = _want_tokens(path)
    assert got["first"] == want and got["second"] == want


def test_without_a_compiler_the_engine_runs_on_torch_paths(tmp_path, checkpoint_factory):
    """A failing compiler (CXX=false) with an empty cache: one warning, the torch paths, the same greedy tokens; the
    failure is remembered, so the next start does not try again."""
    path = checkpoint_factory("llama")
    env = {"CXX": "false", "PACKSERVE_CACHE_DIR": str(tmp_path)}
    got, log = _run(GENERATE, path, env=env)
    assert got["available"] is False and got["kernel_now"] is None
    assert log.count("CPU kernels unavailable") == 1
    assert got["first"] == got["second"] == _want_tokens(path)
    markers = list((tmp_path / "cpu-kernels").glob("*.failed"))
    assert len(markers) == 1
    again, log = _run(GENERATE, path, env={**env, "CXX": "c++"})  # a working compiler, but the failure is recent
    assert again["available"] is False and "earlier build failed" in log and "delete" in log


def test_compiler_timeout_kills_the_whole_process_group(tmp_path, monkeypatch):
    """The compiler driver starts a child (as g++ starts cc1plus) and both hang: on timeout neither survives."""
    pidfile = tmp_path / "child.pid"
    cc = tmp_path / "hanging-c++"
    cc.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nwait\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CXX", str(cc))
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        cpu_lib.build("avx2", timeout=4)
    assert time.monotonic() - t < 30
    assert (tmp_path / "cpu-kernels" / cpu_lib.library_path("avx2").with_suffix(".failed").name).exists()
    if not pidfile.exists():  # a loaded machine: the driver was killed before it had started its child
        return
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    state = open(f"/proc/{child}/stat").read().split()[2] if os.path.exists(f"/proc/{child}") else "gone"
    assert state in ("gone", "Z")  # a zombie is dead, only not yet reaped by its (killed) parent's parent


def test_builds_are_per_isa_and_replace_only_their_own_stale_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "cpu-kernels"
    folder.mkdir()
    (folder / "packserve_cpu_avx2_oldsource000.so").write_bytes(b"stale")
    (folder / "packserve_cpu_avx512_123456789abc.so").write_bytes(b"another variant's build")
    target = cpu_lib.build("avx2")
    assert target.name.startswith("packserve_cpu_avx2_")
    assert cpu_lib.load(target, "avx2").varlen_attention is torch.ops.packserve_avx2.varlen_attention
    assert sorted(p.name for p in folder.iterdir()) == sorted([target.name, "packserve_cpu_avx512_123456789abc.so"])


def test_cpu_isa_forces_the_avx2_build_and_rejects_what_the_cpu_lacks(tmp_path):
    script = textwrap.dedent("""
        import json
        from packserve.kernels import cpu_lib
        print(json.dumps({"ok": cpu_lib.wait(), "isa": cpu_lib.loaded_isa()}))
    """)
    got, _ = _run(script, env={"PACKSERVE_CPU_ISA": "avx2"})
    assert got == {"ok": True, "isa": "avx2"}
    if "avx512" not in cpu_lib.supported_isas():
        got, log = _run(script, env={"PACKSERVE_CPU_ISA": "avx512"})
        assert got["ok"] is False and "this CPU runs" in log


def test_build_kernels_command_builds_ahead_of_time(tmp_path):
    """`packserve build-kernels --isa all --ship` (what the Docker image runs) leaves one library per ISA in the
    cache and copies them into the environment (here a stand-in sys.prefix), where they are found first even when
    the cache folder is empty (a volume mounted over it)."""
    prefix = tmp_path / "prefix"
    script = textwrap.dedent(f"""
        import json, sys
        sys.prefix = {str(prefix)!r}
        from packserve.commands import build_kernels
        from packserve.kernels import cpu_lib
        rc = build_kernels.main(["--isa", "all", "--ship"])
        found = {{isa: str(cpu_lib.library_path(isa)) for isa in cpu_lib.ISAS}}
        print(json.dumps({{"rc": rc, "found": found}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PACKSERVE_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    names = sorted(p.name.split("_")[2] for p in (tmp_path / "cache" / "cpu-kernels").glob("*.so"))
    assert got["rc"] == 0 and names == sorted(cpu_lib.ISAS)
    shipped = prefix / "share" / "packserve" / "cpu-kernels"
    assert sorted(p.name.split("_")[2] for p in shipped.glob("*.so")) == sorted(cpu_lib.ISAS)
    assert all(Path(path).parent == shipped for path in got["found"].values())  # the shipped copies come first
