"""C kernels for the CPU path: paged decode attention, fused (add +) RMSNorm, RoPE, KV writes.

On CPU a decode step is a few memory-bound matmuls plus ~100 small ops; torch runs each small op as several
passes (RMSNorm: square, mean, rsqrt, two multiplies) with a dispatch each, and its paged-attention path
gathers every request's KV blocks into a padded copy before SDPA reads it again. These kernels do each job in
one pass over the data:

- `paged_decode_attention`: one query token per request; each cached K/V row is read once, in place in its
  block, for the G query heads that share it (GQA): s_j = scale * q . k_j (j < len), p = softmax(s),
  out = sum_j p_j v_j.
- `rms_norm`: Llama RMSNorm (fp32 statistics, then times weight or offset + weight), optionally after the residual
  add (`residual=`), whose sum is also returned.
- `rotary_`: rotate-half RoPE in place on q and k (strided views of the fused QKV output).
- `write_kv`: each token's K and V rows into their cache slots.

The C source below is compiled on first use with the system's gcc (-O3 -march=native) into the packserve
cache folder and called through ctypes, which releases the GIL. Loops over rows / work items use OpenMP:
the library links libgomp.so.1, which resolves to the copy torch already loaded, so the kernels run on the
calling thread's torch worker pool instead of starting a second pool. `available()` is False without a
compiler; callers then keep their torch paths. Each kernel has a pure-torch reference the tests compare with
(`paged_decode_ref` here; the RMSNorm and RoPE references live in `packserve.kernels.rmsnorm` and
`packserve.layers.rotary`).
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

#ifdef PACKSERVE_MVEC
/* glibc's libmvec has SIMD variants of expf; math.h only announces them under -ffast-math, which would also
   let gcc assume no infinities. Announce them here so the softmax loop vectorizes (link: -lmvec). */
__attribute__((simd("notinbranch"))) float expf(float);
#endif

static const int64_t *sort_lens;  /* qsort has no context argument; set under the caller's lock */

static int longer_first(const void *a, const void *b) {
    const int64_t la = sort_lens[*(const int64_t *)a], lb = sort_lens[*(const int64_t *)b];
    return (la < lb) - (la > lb);
}

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
    for (int64_t b = 0; b < B; b++) order[b] = b;
    sort_lens = seq_lens;
    qsort(order, (size_t)B, sizeof(int64_t), longer_first);
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


def _build() -> ctypes.CDLL:
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


def _enabled() -> bool:
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
    if not _enabled():
        return False
    if _lib is not None:
        return True
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except Exception as exc:  # no compiler, read-only cache, ...: callers use the torch path
                _error = f"{type(exc).__name__}: {exc}"
                log.warning("packserve CPU kernels unavailable (%s); using the torch paths", _error)
        return _lib is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                           scale: float, check_values: bool = True) -> torch.Tensor:
    """q: [B, H, D] fp32 (rows may be strided, heads and dims contiguous); k/v_cache: [slots, Hkv, D] fp32
    contiguous, slot = block * block_size + offset; block_table: int64 [B, max_blocks]; seq_lens: int64 [B]
    (context length including the current token). Returns [B, H, D]. check_values=False skips the range
    checks of seq_lens (the runner builds them in range; each check is a tensor reduction per layer)."""
    if not available():
        raise RuntimeError(f"packserve CPU kernels unavailable: {_error}")
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
    if check_values and B and int(seq_lens.min()) < 1:
        raise ValueError("every request attends at least one cached token")
    if check_values and B and int(seq_lens.max()) > block_table.shape[1] * block_size:
        raise ValueError("a sequence is longer than its block table")
    out = torch.empty(B, H, D, dtype=torch.float32)
    if B == 0:
        return out
    with _lock:  # the kernel's sort uses a static
        failed = _lib.paged_decode_attention(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(),
            block_table.shape[1], seq_lens.data_ptr(), out.data_ptr(), B, H, Hkv, D, block_size, scale)
    if failed:
        raise MemoryError("paged decode kernel: scratch allocation failed")
    return out


def usable(*tensors: torch.Tensor) -> bool:
    """The dispatchers' rule: CPU fp32 tensors and the kernels built."""
    for t in tensors:
        if not t.is_cpu or t.dtype is not torch.float32:
            return False
    return available()


def _rows(x: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """x as [rows, cols] with a row stride (no copy when the last dim is contiguous)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.dim() != 2 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        raise ValueError(f"{name} must have a row layout")
    return x2, x2.stride(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or with residual (norm(x + residual), x + residual); fp32 CPU tensors, new outputs."""
    shape, cols = x.shape, x.shape[-1]
    if (x.dim() == 2 and x.is_contiguous() and (weight is None or (weight.shape == (cols,) and weight.is_contiguous()))
            and (residual is None or (residual.shape == shape and residual.is_contiguous()))):
        # The common case (the residual stream), without the general layout handling below.
        rows = shape[0]
        out = torch.empty(rows, cols, dtype=torch.float32)
        res_out = None if residual is None else torch.empty(rows, cols, dtype=torch.float32)
        if rows:
            _lib.rms_norm_f32(x.data_ptr(), cols, None if residual is None else residual.data_ptr(), cols,
                              None if res_out is None else res_out.data_ptr(), cols,
                              None if weight is None else weight.data_ptr(), out.data_ptr(), cols, rows, cols,
                              eps, offset)
        return out if residual is None else (out, res_out)
    x2, sx = _rows(x, "x")
    rows = x2.shape[0]
    out = torch.empty(rows, cols, dtype=torch.float32)
    res_out, r_ptr, sr, ro_ptr = None, None, 0, None
    if residual is not None:
        if residual.shape != shape:
            raise ValueError("residual must match x")
        r2, sr = _rows(residual, "residual")
        res_out = torch.empty(rows, cols, dtype=torch.float32)
        r_ptr, ro_ptr = r2.data_ptr(), res_out.data_ptr()
    w_ptr = None
    if weight is not None:
        if weight.shape != (cols,):
            raise ValueError("weight must have one value per column")
        w_ptr = weight.contiguous().data_ptr()
    if rows:
        _lib.rms_norm_f32(x2.data_ptr(), sx, r_ptr, sr, ro_ptr, cols, w_ptr, out.data_ptr(), cols, rows, cols,
                          eps, offset)
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            check_values: bool = True) -> None:
    """In place on x: [T, heads, D] (token stride free, heads and dims contiguous); cos/sin: [max_pos, rot/2].
    check_values=False skips the positions range check (the runner keeps positions under max_model_len)."""
    T, heads, D = x.shape
    if x.stride(2) != 1 or x.stride(1) != D:
        raise ValueError("x heads and dims must be contiguous")
    if positions.dtype != torch.int64 or positions.shape != (T,):
        raise ValueError("positions must be int64 [T]")
    cos, sin = cos.contiguous(), sin.contiguous()
    if check_values and T and int(positions.max()) >= cos.shape[0]:
        raise ValueError("position beyond the rotary table")
    if T:
        _lib.rotary_f32(x.data_ptr(), x.stride(0), T, heads, D, positions.contiguous().data_ptr(), cos.data_ptr(),
                        sin.data_ptr(), 2 * cos.shape[1])


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k/v: [T, Hkv, D] (token stride free) into [slots, Hkv, D] caches at int64 `slots` [T]."""
    T = k.shape[0]
    row = k.shape[1] * k.shape[2]
    for t, name in ((k, "k"), (v, "v")):
        if t.shape != k.shape or t.stride(2) != 1 or t.stride(1) != k.shape[2]:
            raise ValueError(f"{name}: heads and dims must be contiguous, shapes equal")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[1:] != k.shape[1:]:
        raise ValueError("caches must be contiguous [slots, Hkv, D]")
    if slots.dtype != torch.int64 or slots.shape != (T,):
        raise ValueError("slots must be int64 [T]")
    if T:
        _lib.write_kv_f32(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                          v_cache.data_ptr(), slots.contiguous().data_ptr(), T, row)


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
