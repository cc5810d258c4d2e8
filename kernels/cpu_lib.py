"""The CPU kernels' operator library: its sources, and building, caching and loading it per ISA.

kernels/csrc holds the kernels (C-style loops in cpu_kernels.h and varlen_attention.h) and their torch operators
(cpu_ops.cpp: schemas, argument checks). torch.utils.cpp_extension (ninja) compiles them once per ISA level, not
per CPU: `avx512` (-march=x86-64-v4: AVX-512 F/BW/CD/DQ/VL) and `avx2` (-march=x86-64-v3: AVX2 + FMA, 16 vector
registers). Each level registers its operators in a namespace of its own (torch.ops.packserve_avx512,
torch.ops.packserve_avx2), so both can be loaded in one process and tested side by side. A build for a level runs
on every CPU that has it, so `packserve build-kernels` builds both ahead of time (the Docker image does) and a
cache folder can be shared by different machines; the file name carries a hash of the sources, the flags and the
torch version. PACKSERVE_CPU_ISA picks the variant (`auto`: the best this CPU runs; `avx2` forces the AVX2 build
on an AVX-512 CPU, as the tests do); other CPUs keep the torch paths.

A server never waits on the compiler: `available()` loads a cached build at once, or starts the build in a
background thread and answers False (the torch paths) until it is loaded, after which every dispatcher switches
to the kernels. The compiler runs in a child process of its own process group, so a timeout kills ninja and cc1
too, and a failed build is remembered for an hour (one log line, no retry at every start). Loading needs no
compiler (the Docker runtime image has none).

Loops over rows and work items use OpenMP: the library links libgomp.so.1, which resolves to the copy torch
already loaded, so the kernels run on the calling thread's torch worker pool instead of starting a second pool.
PACKSERVE_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")  # shipped as package data (pyproject.toml)
SOURCES = ("cpu_ops.cpp", "cpu_kernels.h", "varlen_attention.h", "brgemm_linear.h")

# Reassociation lets gcc vectorize the dot products and sums; no -ffinite-math-only (exp of large negatives).
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp", "-lm"]
MVEC = (["-DPACKSERVE_MVEC"], ["-lmvec"])  # glibc's vector math library, when the toolchain has it
ISA_FLAGS = {
    "avx512": ["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
}
# What /proc/cpuinfo must list for each level (x86-64-v4 / v3 as gcc defines them).
ISA_CPU_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2"},
    "avx2": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
}
ISAS = ("avx512", "avx2")  # best first
BUILD_TIMEOUT_S = 300.0
FAILURE_TTL_S = 3600.0  # a failed build is not retried for this long (by any process sharing the cache)

_lock = threading.Lock()
_ops: Any = None  # the loaded variant's torch.ops namespace
_ops_isa: str | None = None
_loaded: dict[str, Any] = {}  # isa -> namespace, every variant loaded in this process
_error: str | None = None
_builder: threading.Thread | None = None


def sources_digest() -> str:
    """A hash of the kernel sources (cache keys here and in the GEMM calibration)."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    from packserve import envs

    root = envs.get("CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "packserve")
    return Path(root) / "cpu-kernels"


def _cpuinfo_field(name: str) -> str:
    """The first `name` line of /proc/cpuinfo (one CPU's), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(name)), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip()


def cpu_flags() -> set[str]:
    return set(_cpuinfo_field("flags").split())


def cpu_model() -> str:
    """The CPU's model name (for cache keys and benchmark headers)."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def supported_isas() -> list[str]:
    """The levels this CPU runs, best first (none off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = cpu_flags()
    return [isa for isa in ISAS if ISA_CPU_FLAGS[isa] <= flags]


def selected_isa() -> str | None:
    """The variant this process uses: PACKSERVE_CPU_ISA, or the best the CPU runs (None: torch paths only)."""
    from packserve import envs

    want = envs.get("CPU_ISA")
    have = supported_isas()
    if want == "auto":
        return have[0] if have else None
    if want not in have:
        raise RuntimeError(f"PACKSERVE_CPU_ISA={want}: this CPU runs {have or 'neither AVX2 nor AVX-512'}")
    return want


def shipped_dir() -> Path:
    """Builds shipped with the install, read-only (`packserve build-kernels --ship`: the Docker image puts them
    in its venv, where a cache volume mounted over the home folder cannot hide them)."""
    return Path(sys.prefix) / "share" / "packserve" / "cpu-kernels"


def library_path(isa: str) -> Path:
    """One file per ISA, sources, flags and torch version (the operators link against torch's C++ ABI): the
    shipped build when there is one, else the cache folder's."""
    key = " ".join([sources_digest(), *CFLAGS, *LDFLAGS, *ISA_FLAGS[isa], torch.__version__])
    name = f"packserve_cpu_{isa}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"
    shipped = shipped_dir() / name
    return shipped if shipped.exists() else cache_dir() / name


def _failure_marker(target: Path) -> Path:
    return target.with_suffix(".failed")


def build(isa: str, timeout: float = BUILD_TIMEOUT_S) -> Path:
    """Compile the `isa` variant into the cache (no-op when it is there); returns its path. Raises on failure
    and leaves a marker that keeps `available()` from retrying for FAILURE_TTL_S."""
    target = library_path(isa)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            for cflags, ldflags in (MVEC, ([], [])):
                spec = {"name": target.stem, "sources": [str(CSRC / "cpu_ops.cpp")], "build_directory": tmp,
                        "extra_cflags": [*CFLAGS, *ISA_FLAGS[isa], f"-DPACKSERVE_NS=packserve_{isa}", *cflags],
                        "extra_ldflags": [*LDFLAGS, *ldflags]}
                rc, err = _compile(spec, timeout)
                if rc == 0:
                    break
            else:
                raise RuntimeError(f"the C++ build failed: {err.strip()[-800:]}")
            os.replace(Path(tmp) / f"{target.stem}.so", target)  # atomic: concurrent builders never load half a file
        for old in target.parent.glob(f"packserve_cpu_{isa}_*"):  # older sources' builds of this variant
            if old != target:
                old.unlink(missing_ok=True)
    except Exception as exc:
        try:
            _failure_marker(target).write_text(f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
        raise
    return target


def _compile(spec: dict, timeout: float) -> tuple[int, str]:
    """torch.utils.cpp_extension in a child process (packserve.kernels.cpu_compile) in a process group of its own:
    on timeout the whole group (ninja, the compiler driver, cc1plus) is killed."""
    env = dict(os.environ)
    try:  # the `ninja` wheel's binary, also when this venv's bin/ is not on PATH
        import ninja

        env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
    except ImportError:
        pass
    proc = subprocess.Popen([sys.executable, "-m", "packserve.kernels.cpu_compile", json.dumps(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"compiler timed out after {timeout:.0f} s") from None
    return proc.returncode, err


def load(path: Path, isa: str) -> Any:
    """Load a built variant (once per process) and return its torch.ops namespace."""
    if isa not in _loaded:
        # torch (imported above) already loaded libgomp.so.1: the library binds to that copy and its pools.
        torch.ops.load_library(str(path))
        from packserve.kernels import cpu_fake

        cpu_fake.register(f"packserve_{isa}")
        _loaded[isa] = getattr(torch.ops, f"packserve_{isa}")
    return _loaded[isa]


_env_raw: str | None = None  # the PACKSERVE_CPU_KERNELS value last parsed, and its meaning
_env_on = True


def enabled() -> bool:
    """PACKSERVE_CPU_KERNELS, re-parsed only when its raw value changes (the dispatchers ask on every call)."""
    global _env_raw, _env_on
    raw = os.environ.get("PACKSERVE_CPU_KERNELS")
    if raw != _env_raw:
        from packserve import envs

        _env_on, _env_raw = envs.get("CPU_KERNELS"), raw
    return _env_on


def _fail(reason: str) -> None:
    global _error
    _error = reason
    log.warning("packserve CPU kernels unavailable (%s); using the torch paths", reason)


def _build_and_load(isa: str) -> None:
    global _ops, _ops_isa
    t0 = time.monotonic()
    try:
        ops = load(build(isa), isa)
    except Exception as exc:  # no compiler, read-only cache, timeout, ...: callers keep the torch paths
        _fail(f"{type(exc).__name__}: {exc}")
        return
    _ops, _ops_isa = ops, isa
    log.info("packserve CPU kernels (%s) built in %.1f s; the C paths are on", isa, time.monotonic() - t0)


def _start() -> None:
    """Under _lock, once per process: load the cached build, or start building it in the background."""
    global _builder
    try:
        isa = selected_isa()
    except RuntimeError as exc:
        _fail(str(exc))
        return
    if isa is None:
        _fail(f"no AVX2 or AVX-512 on this CPU ({platform.machine()})")
        return
    target = library_path(isa)
    marker = _failure_marker(target)
    if not target.exists() and marker.exists() and time.time() - marker.stat().st_mtime < FAILURE_TTL_S:
        _fail(f"an earlier build failed ({marker.read_text().strip()[:300]}); delete {marker} to retry now")
        return
    if target.exists():
        _build_and_load(isa)
        return
    log.info("building the packserve CPU kernels (%s) in the background; torch paths until they load", isa)
    _builder = threading.Thread(target=_build_and_load, args=(isa,), name="packserve-cpu-kernels", daemon=True)
    _builder.start()


def available() -> bool:
    """True once the library is loaded. The first call loads a cached build, or starts a background build and
    answers False until it is done (callers keep their torch paths meanwhile). PACKSERVE_CPU_KERNELS=0: False."""
    if _ops is not None:
        return enabled()
    if not enabled() or _error is not None:
        return False
    with _lock:
        if _ops is None and _error is None and _builder is None:
            _start()
    return _ops is not None


def wait(timeout: float | None = None) -> bool:
    """Start the build if needed and wait for it (tests, benchmarks, `packserve build-kernels`)."""
    if available() or not enabled():
        return available()
    builder = _builder
    if builder is not None:
        builder.join(timeout)
    return available()


def loaded_isa() -> str | None:
    return _ops_isa if _ops is not None else None


def use(isa: str) -> Any:
    """Load (building if needed, synchronously) the `isa` variant in place of the current one: the tests run
    every kernel against both variants this way."""
    global _ops, _ops_isa, _error
    if isa not in supported_isas():
        raise RuntimeError(f"this CPU does not run the {isa} variant")
    with _lock:
        ops = load(build(isa), isa)
        _ops, _ops_isa, _error = ops, isa, None
    return ops


def ops() -> Any:
    """The loaded variant's operators (torch.ops.packserve_<isa>); callers check available() first."""
    if _ops is None:
        raise RuntimeError(f"packserve CPU kernels unavailable: {_error or 'not built yet'}")
    return _ops
