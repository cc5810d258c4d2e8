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

C_SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef PACKSERVE_MVEC
/* glibc's libmvec has SIMD variants of expf; math.h only announces them under -ffast-math, which would also
   let gcc assume no infinities. Announce them here so the softmax loop vectorizes (link: -lmvec). */
__attribute__((simd("notinbranch"))) float expf(float);
#endif

/* q: row b, head h at q + b * q_stride + h * D.  Caches: [slots, Hkv, D], slot = block * bs + offset.
   out: [B, H, D] contiguous.  Work items (requests) run longest first, so the dynamic schedule ends balanced.
   Returns 0, or 1 if a scratch allocation failed. */
int paged_decode_attention(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                           const int64_t *block_table, int64_t max_blocks, const int64_t *seq_lens,
                           float *out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale) {
    const int64_t G = H / Hkv;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)B);
    if (!order) return 1;
    for (int64_t b = 0; b < B; b++) {  /* insertion sort, longest first: B is a batch, not a dataset */
        int64_t i = b;
        for (; i > 0 && seq_lens[order[i - 1]] < seq_lens[b]; i--) order[i] = order[i - 1];
        order[i] = b;
    }
    int failed = 0;
    #pragma omp parallel reduction(|:failed)
    {
        /* One work item per request, all its KV heads: each cache slot row (Hkv x D) is streamed once, in
           order, block after block. */
        float *s = (float *)malloc(sizeof(float) * (size_t)(H * max_len));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(H * D));
        if (!s || !acc) failed = 1;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B; item++) {
            if (!s || !acc) continue;
            const int64_t b = order[item], len = seq_lens[b];
            const int64_t *table = block_table + b * max_blocks;
            const float *qb = q + b * q_stride;
            for (int64_t j = 0; j < len; j++) {
                const float *k = k_cache + (table[j / bs] * bs + j % bs) * Hkv * D;
                for (int64_t h = 0; h < H; h++) {
                    const float *qh = qb + h * D, *kh = k + (h / G) * D;
                    float dot = 0.f;
                    for (int64_t d = 0; d < D; d++) dot += qh[d] * kh[d];
                    s[h * len + j] = dot * scale;
                }
            }
            for (int64_t h = 0; h < H; h++) {
                float *sh = s + h * len, m = -FLT_MAX, sum = 0.f;
                for (int64_t j = 0; j < len; j++) m = sh[j] > m ? sh[j] : m;
                #pragma omp simd reduction(+:sum)
                for (int64_t j = 0; j < len; j++) { sh[j] = expf(sh[j] - m); sum += sh[j]; }
                const float inv = 1.f / sum;
                for (int64_t j = 0; j < len; j++) sh[j] *= inv;
            }
            for (int64_t i = 0; i < H * D; i++) acc[i] = 0.f;
            for (int64_t j = 0; j < len; j++) {
                const float *v = v_cache + (table[j / bs] * bs + j % bs) * Hkv * D;
                for (int64_t h = 0; h < H; h++) {
                    const float p = s[h * len + j], *vh = v + (h / G) * D;
                    float *a = acc + h * D;
                    for (int64_t d = 0; d < D; d++) a[d] += p * vh[d];
                }
            }
            float *o = out + b * H * D;
            for (int64_t i = 0; i < H * D; i++) o[i] = acc[i];
        }
        free(s);
        free(acc);
    }
    free(order);
    return failed;
}

/* Llama RMSNorm of each row of x (rows x cols, row strides in elements). With residual: h = x + residual is
   normalized and also written to res_out. out = (h * rstd) * w, or h * rstd * (offset + w) with an offset. */
void rms_norm_f32(const float *x, int64_t sx, const float *residual, int64_t sr, float *res_out, int64_t sro,
                  const float *w, float *out, int64_t so, int64_t rows, int64_t cols, float eps, float offset) {
    #pragma omp parallel for schedule(static) if (rows * cols > 32768)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * sx;
        float *o = out + r * so;
        const float *h = xr;
        if (residual) {
            const float *rr = residual + r * sr;
            float *ro = res_out + r * sro;
            for (int64_t c = 0; c < cols; c++) ro[c] = xr[c] + rr[c];
            h = ro;
        }
        float ss = 0.f;
        for (int64_t c = 0; c < cols; c++) ss += h[c] * h[c];
        const float rstd = 1.f / sqrtf(ss / (float)cols + eps);
        if (!w) {
            for (int64_t c = 0; c < cols; c++) o[c] = h[c] * rstd;
        } else if (offset != 0.f) {
            for (int64_t c = 0; c < cols; c++) o[c] = h[c] * rstd * (offset + w[c]);
        } else {
            for (int64_t c = 0; c < cols; c++) o[c] = w[c] * (h[c] * rstd);
        }
    }
}

/* Rotate-half RoPE in place: x is [T, heads, D] with token stride sx (heads and dims contiguous); the first
   rot_dim dims turn; cos/sin are [max_pos, rot_dim / 2]. */
void rotary_f32(float *x, int64_t sx, int64_t T, int64_t heads, int64_t D, const int64_t *positions,
                const float *cos_t, const float *sin_t, int64_t rot_dim) {
    const int64_t half = rot_dim / 2;
    #pragma omp parallel for schedule(static) if (T * heads * D > 32768)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + positions[t] * half, *s = sin_t + positions[t] * half;
        for (int64_t h = 0; h < heads; h++) {
            float *x1 = x + t * sx + h * D, *x2 = x1 + half;
            for (int64_t i = 0; i < half; i++) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/* Cache rows: k/v token t (row of `row` floats at stride sk / sv) -> cache slot slots[t]. */
void write_kv_f32(const float *k, int64_t sk, const float *v, int64_t sv, float *k_cache, float *v_cache,
                  const int64_t *slots, int64_t T, int64_t row) {
    #pragma omp parallel for schedule(static) if (T * row > 65536)
    for (int64_t t = 0; t < T; t++) {
        float *kd = k_cache + slots[t] * row, *vd = v_cache + slots[t] * row;
        const float *ks = k + t * sk, *vs = v + t * sv;
        for (int64_t i = 0; i < row; i++) { kd[i] = ks[i]; vd[i] = vs[i]; }
    }
}
"""

# Reassociation lets gcc vectorize the dot products and sums; no -ffinite-math-only (exp of large negatives).
CFLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fassociative-math",
          "-fno-signed-zeros", "-fno-trapping-math"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


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
    src = hashlib.sha256((C_SOURCE + " ".join(CFLAGS)).encode()).hexdigest()[:12]
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
            src.write_text(C_SOURCE)
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
