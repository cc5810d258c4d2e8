"""Paged decode attention for CPU: one query token per request, K/V read in place from the paged cache.

The pure-torch path (packserve.layers.attention.paged_attention) gathers every request's KV blocks into a
padded dense tensor and runs SDPA on it: per decode step it copies the whole context of the batch once and
reads it twice. This kernel reads each cached K/V row once, straight from its block, for the G query heads
that share it (GQA), in one pass per (request, KV head):

    s_j = scale * q . k_j  for j < len;  p = softmax(s);  out = sum_j p_j v_j

It is plain C, compiled on first use with the system's gcc (-O3 -march=native) into the packserve cache
folder and called through ctypes (which releases the GIL). Work items are spread with OpenMP: the library
links libgomp.so.1, which resolves to the copy torch already loaded, so the kernel runs on the calling
thread's torch worker pool rather than a second pool. Without gcc, `available()` is False and callers keep
the torch path. `paged_decode_ref` below is the naive fp32 reference the tests compare against.
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

import torch

log = logging.getLogger(__name__)

C_SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* q: row b, head h at q + b * q_stride + h * D.  Caches: [slots, Hkv, D], slot = block * bs + offset.
   out: [B, H, D] contiguous.  Returns 0, or 1 if a scratch allocation failed. */
int paged_decode_attention(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                           const int64_t *block_table, int64_t max_blocks, const int64_t *seq_lens,
                           float *out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale) {
    const int64_t G = H / Hkv;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(|:failed)
    for (int64_t item = 0; item < B * Hkv; item++) {
        const int64_t b = item / Hkv, kvh = item % Hkv, len = seq_lens[b];
        const int64_t *table = block_table + b * max_blocks;
        float *s = (float *)malloc(sizeof(float) * (size_t)(G * len));
        float *acc = (float *)calloc((size_t)(G * D), sizeof(float));
        if (!s || !acc) { free(s); free(acc); failed = 1; continue; }
        const float *qh = q + b * q_stride + kvh * G * D;
        for (int64_t j = 0; j < len; j++) {
            const float *k = k_cache + ((table[j / bs] * bs + j % bs) * Hkv + kvh) * D;
            for (int64_t g = 0; g < G; g++) {
                const float *qg = qh + g * D;
                float dot = 0.f;
                for (int64_t d = 0; d < D; d++) dot += qg[d] * k[d];
                s[g * len + j] = dot * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *sg = s + g * len, m = -FLT_MAX, sum = 0.f;
            for (int64_t j = 0; j < len; j++) m = sg[j] > m ? sg[j] : m;
            for (int64_t j = 0; j < len; j++) { sg[j] = expf(sg[j] - m); sum += sg[j]; }
            const float inv = 1.f / sum;
            for (int64_t j = 0; j < len; j++) sg[j] *= inv;
        }
        for (int64_t j = 0; j < len; j++) {
            const float *v = v_cache + ((table[j / bs] * bs + j % bs) * Hkv + kvh) * D;
            for (int64_t g = 0; g < G; g++) {
                const float p = s[g * len + j];
                float *a = acc + g * D;
                for (int64_t d = 0; d < D; d++) a[d] += p * v[d];
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *o = out + (b * H + kvh * G + g) * D;
            for (int64_t d = 0; d < D; d++) o[d] = acc[g * D + d];
        }
        free(s);
        free(acc);
    }
    return failed;
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


def _cpu_key() -> str:
    """-march=native code is only valid on the CPU that built it: key the library by the CPU's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256((C_SOURCE + " ".join(CFLAGS) + flags).encode()).hexdigest()[:16]


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    target = _cache_dir() / f"paged_decode_{_cpu_key()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, lib = Path(tmp) / "paged_decode.c", Path(tmp) / "paged_decode.so"
            src.write_text(C_SOURCE)
            proc = subprocess.run([cc, *CFLAGS, str(src), "-o", str(lib), "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            os.replace(lib, target)  # atomic: concurrent builders never load a half-written file
    import torch  # noqa: F401 - torch's libgomp.so.1 must be loaded first, so the kernel shares its pool

    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_attention
    i64, f32p = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [f32p, i64, f32p, f32p, f32p, i64, f32p, f32p, i64, i64, i64, i64, i64, ctypes.c_float]
    fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Build (once per process; the library is cached across processes) and report whether it works here."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except Exception as exc:  # no compiler, read-only cache, ...: callers use the torch path
                _error = f"{type(exc).__name__}: {exc}"
                log.warning("CPU paged decode kernel unavailable (%s); using gather + SDPA", _error)
        return _lib is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    """q: [B, H, D] fp32 (rows may be strided, heads and dims contiguous); k/v_cache: [slots, Hkv, D] fp32
    contiguous, slot = block * block_size + offset; block_table: int64 [B, max_blocks]; seq_lens: int64 [B]
    (context length including the current token). Returns [B, H, D]."""
    if not available():
        raise RuntimeError(f"CPU paged decode kernel unavailable: {_error}")
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    if q.dtype != torch.float32 or k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
        raise TypeError("the CPU paged decode kernel is fp32 only")
    if q.stride(2) != 1 or q.stride(1) != D or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q heads/dims and the caches must be contiguous")
    if H % Hkv or k_cache.shape[2] != D or v_cache.shape[1:] != k_cache.shape[1:]:
        raise ValueError("shape mismatch between q and the caches")
    block_table = block_table.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    if block_table.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError("block_table and seq_lens need one row per request")
    if B and int(seq_lens.min()) < 1:
        raise ValueError("every request attends at least one cached token")
    if B and int(seq_lens.max()) > block_table.shape[1] * block_size:
        raise ValueError("a sequence is longer than its block table")
    out = torch.empty(B, H, D, dtype=torch.float32)
    if B == 0:
        return out
    failed = _lib.paged_decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(),
        block_table.shape[1], seq_lens.data_ptr(), out.data_ptr(), B, H, Hkv, D, block_size, scale)
    if failed:
        raise MemoryError("paged decode kernel: scratch allocation failed")
    return out


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: list[list[int]],
                     seq_lens: list[int], block_size: int, scale: float) -> torch.Tensor:
    """Naive fp64 reference: per request and head, look up each cached token's slot, softmax, weighted sum."""
    B, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        slots = [block_table[b][j // block_size] * block_size + j % block_size for j in range(seq_lens[b])]
        for h in range(H):
            k = k_cache[slots, h // G].double()
            v = v_cache[slots, h // G].double()
            p = torch.softmax(k @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v
    return out
