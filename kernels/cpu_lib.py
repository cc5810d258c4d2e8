"""The C library behind packserve.kernels.cpu_ops: its source, and building, caching and loading it per ISA.

The source is compiled with the system's gcc once per ISA level, not per CPU: `avx512` (-march=x86-64-v4: AVX-512
F/BW/CD/DQ/VL) and `avx2` (-march=x86-64-v3: AVX2 + FMA, 16 vector registers). A build for a level runs on every
CPU that has it, so `packserve build-kernels` can build both ahead of time (the Docker image does) and a cache
folder can be shared by different machines. PACKSERVE_CPU_ISA picks the variant (`auto`: the best this CPU
runs; `avx2` forces the AVX2 build on an AVX-512 CPU, as the tests do); other CPUs keep the torch paths.

A server never waits on the compiler: `available()` loads a cached build at once, or starts the build in a
background thread and answers False (the torch paths) until it is loaded, after which every dispatcher switches
to the kernels. The compiler runs in its own process group, so a timeout kills cc1 too, and a failed build is
remembered for an hour (one log line, no retry at every start).

Loops over rows and work items use OpenMP: the library links libgomp.so.1, which resolves to the copy torch
already loaded, so the kernels run on the calling thread's torch worker pool instead of starting a second pool.
Calls through ctypes release the GIL. PACKSERVE_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch  # noqa: F401 - loads libgomp.so.1 before the library binds to it

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")  # shipped as package data (pyproject.toml)

# Reassociation lets gcc vectorize the dot products and sums; no -ffinite-math-only (exp of large negatives).
CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math"]
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
_lib: ctypes.CDLL | None = None
_lib_isa: str | None = None
_error: str | None = None
_builder: threading.Thread | None = None


def _source() -> str:
    return SOURCE.read_text()


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


def library_path(isa: str) -> Path:
    """One file per ISA and source: the name carries a hash of the source and the flags."""
    src = hashlib.sha256((_source() + " ".join(CFLAGS + ISA_FLAGS[isa])).encode()).hexdigest()[:12]
    return cache_dir() / f"cpu_ops_{isa}_{src}.so"


def _failure_marker(target: Path) -> Path:
    return target.with_suffix(".failed")


def build(isa: str, timeout: float = BUILD_TIMEOUT_S) -> Path:
    """Compile the `isa` variant into the cache (no-op when it is there); returns its path. Raises on failure
    and leaves a marker that keeps `available()` from retrying for FAILURE_TTL_S."""
    target = library_path(isa)
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    try:
        if cc is None:
            raise RuntimeError("no C compiler (gcc) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, lib = Path(tmp) / "cpu_ops.c", Path(tmp) / "cpu_ops.so"
            src.write_text(_source())
            # With glibc's vector math library if the toolchain has it, else plain libm.
            for extra in (["-DPACKSERVE_MVEC", "-lmvec"], []):
                rc, err = _compile([cc, *CFLAGS, *ISA_FLAGS[isa], str(src), "-o", str(lib), *extra, "-lm"], timeout)
                if rc == 0:
                    break
            else:
                raise RuntimeError(f"{cc} failed: {err.strip()[-500:]}")
            os.replace(lib, target)  # atomic: concurrent builders never load a half-written file
        for old in target.parent.glob(f"cpu_ops_{isa}_*"):  # older sources' builds of this variant
            if old != target:
                old.unlink(missing_ok=True)
    except Exception as exc:
        try:
            _failure_marker(target).write_text(f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
        raise
    return target


def _compile(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run the compiler in a process group of its own: on timeout the whole group (cc1, as) is killed, not only
    the gcc driver."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"compiler timed out after {timeout:.0f} s") from None
    return proc.returncode, err


def load(path: Path) -> ctypes.CDLL:
    # torch (imported above) already loaded libgomp.so.1: the library binds to that copy and its pools.
    lib = ctypes.CDLL(str(path))
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    signatures = {
        "paged_decode_attention": ([ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, f32],
                                   ctypes.c_int),
        "rms_norm_f32": ([ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, f32, f32], None),
        "rotary_f32": ([ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64], None),
        "linear_panels_f32": ([ptr, i64, ptr, ptr, ptr, i64, i64, i64], None),
        "silu_mul_f32": ([ptr, i64, ptr, i64, i64], None),
        "argmax_rows_f32": ([ptr, i64, i64, i64, ptr], None),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


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
    global _lib, _lib_isa
    t0 = time.monotonic()
    try:
        lib = load(build(isa))
    except Exception as exc:  # no compiler, read-only cache, timeout, ...: callers keep the torch paths
        _fail(f"{type(exc).__name__}: {exc}")
        return
    _lib, _lib_isa = lib, isa
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
    if _lib is not None:
        return enabled()
    if not enabled() or _error is not None:
        return False
    with _lock:
        if _lib is None and _error is None and _builder is None:
            _start()
    return _lib is not None


def wait(timeout: float | None = None) -> bool:
    """Start the build if needed and wait for it (tests, benchmarks, `packserve build-kernels`)."""
    if available() or not enabled():
        return available()
    builder = _builder
    if builder is not None:
        builder.join(timeout)
    return available()


def loaded_isa() -> str | None:
    return _lib_isa if _lib is not None else None


def use(isa: str) -> ctypes.CDLL:
    """Load (building if needed, synchronously) the `isa` variant in place of the current one: the tests run
    every kernel against both variants this way."""
    global _lib, _lib_isa, _error
    if isa not in supported_isas():
        raise RuntimeError(f"this CPU does not run the {isa} variant")
    with _lock:
        lib = load(build(isa))
        _lib, _lib_isa, _error = lib, isa, None
    return lib


def handle() -> ctypes.CDLL:
    """The loaded library; callers check available() first."""
    if _lib is None:
        raise RuntimeError(f"packserve CPU kernels unavailable: {_error or 'not built yet'}")
    return _lib
