"""The C library behind packserve.kernels.cpu_ops: its source, and building, caching and loading it.

The source is compiled on first use with the system's gcc (-O3 -march=native) into the packserve cache folder
(one build per CPU and source) and loaded with ctypes, whose calls release the GIL. Loops over rows and work
items use OpenMP: the library links libgomp.so.1, which resolves to the copy torch already loaded, so the
kernels run on the calling thread's torch worker pool instead of starting a second pool. Without a compiler
`available()` is False and the callers keep their torch paths; PACKSERVE_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch  # noqa: F401 - loads libgomp.so.1 before the library binds to it

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")  # shipped as package data (pyproject.toml)

# Reassociation lets gcc vectorize the dot products and sums; no -ffinite-math-only (exp of large negatives).
CFLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fassociative-math",
          "-fno-signed-zeros", "-fno-trapping-math"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _source() -> str:
    return SOURCE.read_text()


def _cache_dir() -> Path:
    from packserve import envs

    root = envs.get("CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "packserve")
    return Path(root) / "cpu-kernels"


def _library_name() -> tuple[str, str]:
    """(name, stale-pattern). -march=native code is only valid on the CPU that built it, so the name carries a
    hash of the CPU's flags and one of the source and compiler flags; builds of older sources for the same CPU
    are stale (a cache folder shared by different CPUs keeps one build per CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    cpu = hashlib.sha256(flags.encode()).hexdigest()[:8]
    src = hashlib.sha256((_source() + " ".join(CFLAGS)).encode()).hexdigest()[:12]
    return f"cpu_ops_{cpu}_{src}.so", f"cpu_ops_{cpu}_*.so"


def build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    name, stale = _library_name()
    target = _cache_dir() / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, lib = Path(tmp) / "cpu_ops.c", Path(tmp) / "cpu_ops.so"
            src.write_text(_source())
            # With glibc's vector math library if the toolchain has it, else plain libm.
            for extra in (["-DPACKSERVE_MVEC", "-lmvec"], []):
                proc = subprocess.run([cc, *CFLAGS, str(src), "-o", str(lib), *extra, "-lm"], capture_output=True,
                                      text=True, timeout=120)
                if proc.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            os.replace(lib, target)  # atomic: concurrent builders never load a half-written file
            for old in target.parent.glob(stale):  # this CPU's builds of older sources
                if old != target:
                    old.unlink(missing_ok=True)
    # torch (imported above) already loaded libgomp.so.1: the library binds to that copy and its pools.
    lib = ctypes.CDLL(str(target))
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    signatures = {
        "paged_decode_attention": ([ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, f32],
                                   ctypes.c_int),
        "rms_norm_f32": ([ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, f32, f32], None),
        "rotary_f32": ([ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64], None),
        "write_kv_f32": ([ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64], None),
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


def available() -> bool:
    """Build (once per process; the library is cached across processes) and report whether it works here.
    PACKSERVE_CPU_KERNELS=0 turns the kernels off (the torch paths run instead)."""
    global _lib, _error
    if not enabled():
        return False
    if _lib is not None:
        return True
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = build()
            except Exception as exc:  # no compiler, read-only cache, ...: callers use the torch path
                _error = f"{type(exc).__name__}: {exc}"
                log.warning("packserve CPU kernels unavailable (%s); using the torch paths", _error)
        return _lib is not None


def handle() -> ctypes.CDLL:
    """The loaded library; callers check available() first."""
    if _lib is None:
        raise RuntimeError(f"packserve CPU kernels unavailable: {_error}")
    return _lib
