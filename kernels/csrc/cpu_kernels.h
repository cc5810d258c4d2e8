/* The CPU kernels' loops (plain C style, compiled as C++ into the operators of cpu_ops.cpp). */
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef PACKSERVE_MVEC
/* glibc's libmvec has SIMD variants of expf; math.h only announces them under -ffast-math, which would also
   let gcc assume no infinities. Announce them here so the softmax loops vectorize (link: -lmvec). */
extern "C" __attribute__((simd("notinbranch"))) float expf(float) noexcept;
#endif

namespace packserve {

/* Paged decode attention, flash-decoding style: one work item per (request, KV head) streams that head's cached
   rows once, in tiles of 16 tokens, with an online softmax (running max m, running sum l, rescaled accumulator),
   so there is no score buffer and no second pass. The next tile's rows are prefetched: blocks are scattered, so
   the hardware prefetcher cannot run ahead, and a decode step's KV has usually left the caches since the last
   step. Layout: q row b, head h at q + b * q_stride + h * D; caches [slots, Hkv, D], slot = block * bs + offset;
   out [B, H, D] contiguous. The G = H / Hkv query heads of a KV head share each row it loads (GQA). */
#define TILE 16

static inline void tile_rows(const float *k_cache, const float *v_cache, const int64_t *table, int64_t j0,
                             int n, int64_t bs, int64_t row, const float **kp, const float **vp) {
    for (int jj = 0; jj < n; jj++) {
        const int64_t j = j0 + jj, slot = table[j / bs] * bs + j % bs;
        kp[jj] = k_cache + slot * row;
        vp[jj] = v_cache + slot * row;
    }
}

static inline void prefetch_tile(const float *k_cache, const float *v_cache, const int64_t *table, int64_t j0,
                                 int64_t len, int64_t bs, int64_t row, int64_t D) {
    for (int64_t j = j0; j < j0 + TILE && j < len; j++) {
        const int64_t slot = table[j / bs] * bs + j % bs;
        const char *k = (const char *)(k_cache + slot * row), *v = (const char *)(v_cache + slot * row);
        for (int64_t c = 0; c < D * 4; c += 64) { __builtin_prefetch(k + c); __builtin_prefetch(v + c); }
    }
}

/* Online-softmax update of one head for a tile of scores s[0..n) (lanes n..TILE are ignored): turns s into
   p = exp(s - m_new) (0 past n) and returns alpha = exp(m_old - m_new), the factor for the accumulator. */
static inline float softmax_tile(float *s, int n, float *m, float *l) {
    float mx = *m;
    for (int jj = 0; jj < n; jj++) mx = s[jj] > mx ? s[jj] : mx;
    for (int jj = n; jj < TILE; jj++) s[jj] = -INFINITY;
    const float alpha = expf(*m - mx);  /* the first tile: exp(-inf) = 0 */
    float sum = 0.f;
    #pragma omp simd reduction(+:sum)
    for (int jj = 0; jj < TILE; jj++) { s[jj] = expf(s[jj] - mx); sum += s[jj]; }
    *l = *l * alpha + sum;
    *m = mx;
    return alpha;
}

/* Any D and G: plain loops (gcc vectorizes the d loops). q/out point at the item's first query head; the caches
   at its KV head. */
static void item_scalar(const float *q, const float *k_cache, const float *v_cache, const int64_t *table,
                        int64_t len, float *out, int64_t row, int64_t D, int64_t G, int64_t bs, float scale) {
    float acc[G * D], s[G][TILE], m[G], l[G];
    const float *kp[TILE], *vp[TILE];
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0.f;
    for (int64_t h = 0; h < G; h++) { m[h] = -INFINITY; l[h] = 0.f; }
    for (int64_t j0 = 0; j0 < len; j0 += TILE) {
        const int n = len - j0 < TILE ? (int)(len - j0) : TILE;
        tile_rows(k_cache, v_cache, table, j0, n, bs, row, kp, vp);
        prefetch_tile(k_cache, v_cache, table, j0 + TILE, len, bs, row, D);
        for (int64_t h = 0; h < G; h++) {
            for (int jj = 0; jj < n; jj++) {
                float dot = 0.f;
                for (int64_t d = 0; d < D; d++) dot += q[h * D + d] * kp[jj][d];
                s[h][jj] = dot * scale;
            }
            const float alpha = softmax_tile(s[h], n, &m[h], &l[h]);
            for (int64_t d = 0; d < D; d++) acc[h * D + d] *= alpha;
        }
        for (int jj = 0; jj < n; jj++)
            for (int64_t h = 0; h < G; h++)
                for (int64_t d = 0; d < D; d++) acc[h * D + d] += s[h][jj] * vp[jj][d];
    }
    for (int64_t h = 0; h < G; h++)
        for (int64_t d = 0; d < D; d++) out[h * D + d] = acc[h * D + d] / l[h];
}

/* D = 16 * C: 16-float vectors (one AVX-512 register; gcc splits them on narrower ISAs). Each head's q and
   accumulator live in registers when C and G are constants (see the dispatch). A tile's 16 dot products are
   summed across lanes together (transpose_sum) instead of one horizontal sum each. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16 ld16(const float *p) { v16 x; memcpy(&x, p, 64); return x; }
static inline void st16(float *p, v16 x) { memcpy(p, &x, 64); }

/* Lane i of the result = the sum of the lanes of a[BITREV4[i]]: four levels, each adding the two halves of
   pairs of vectors; feeding the vectors in bit-reversed order puts token i's sum in lane i. */
static const int BITREV4[TILE] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
static const v16i LO1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                  HI1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                  LO2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                  HI2 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                  LO3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                  HI3 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                  LO4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                  HI4 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
#define HALVES(x, y, lo, hi) (__builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi))
static inline v16 transpose_sum(const v16 *a) {
    v16 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) b[i] = HALVES(a[2 * i], a[2 * i + 1], LO1, HI1);
    for (int i = 0; i < 4; i++) c[i] = HALVES(b[2 * i], b[2 * i + 1], LO2, HI2);
    for (int i = 0; i < 2; i++) d[i] = HALVES(c[2 * i], c[2 * i + 1], LO3, HI3);
    return HALVES(d[0], d[1], LO4, HI4);
}

static inline __attribute__((always_inline)) void item_vec(
        const float *q, const float *k_cache, const float *v_cache, const int64_t *table, int64_t len, float *out,
        int64_t row, const int C, const int G, int64_t bs, float scale) {
    v16 qv[G][C], acc[G][C];
    float m[G], l[G], p[G][TILE] __attribute__((aligned(64)));
    const float *kp[TILE], *vp[TILE];
    for (int h = 0; h < G; h++) {
        for (int c = 0; c < C; c++) { qv[h][c] = ld16(q + (h * C + c) * 16) * scale; acc[h][c] = (v16){0}; }
        m[h] = -INFINITY; l[h] = 0.f;
    }
    for (int64_t j0 = 0; j0 < len; j0 += TILE) {
        const int n = len - j0 < TILE ? (int)(len - j0) : TILE;
        tile_rows(k_cache, v_cache, table, j0, n, bs, row, kp, vp);
        prefetch_tile(k_cache, v_cache, table, j0 + TILE, len, bs, row, 16 * C);
        for (int h = 0; h < G; h++) {
            v16 part[TILE];
            for (int i = 0; i < TILE; i++) {
                const int jj = BITREV4[i];
                v16 t = (v16){0};
                if (jj < n)
                    for (int c = 0; c < C; c++) t += qv[h][c] * ld16(kp[jj] + c * 16);
                part[i] = t;
            }
            st16(p[h], transpose_sum(part));
            const float alpha = softmax_tile(p[h], n, &m[h], &l[h]);
            for (int c = 0; c < C; c++) acc[h][c] *= alpha;
        }
        for (int jj = 0; jj < n; jj++)
            for (int c = 0; c < C; c++) {
                const v16 v = ld16(vp[jj] + c * 16);
                for (int h = 0; h < G; h++) acc[h][c] += p[h][jj] * v;
            }
    }
    for (int h = 0; h < G; h++)
        for (int c = 0; c < C; c++) st16(out + (h * C + c) * 16, acc[h][c] * (1.f / l[h]));
}

#define VEC_CASE(c, g) if (C == c && G == g) { item_vec(qi, kc, vc, table, len, oi, row, c, g, bs, scale); continue; }

/* Returns 0, or 1 if the work order could not be allocated. */
static int paged_decode_attention(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                           const int64_t *block_table, int64_t max_blocks, const int64_t *seq_lens,
                           float *out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale) {
    const int64_t G = H / Hkv, C = D / 16, row = Hkv * D;
#ifdef __AVX512F__
    const int vec = D % 16 == 0 && C <= 16 && G <= 8;
#else
    /* 16 vector registers (AVX2) cannot hold a head group's q and accumulators: item_vec would spill every
       FMA's operands (measured 1.3x slower than torch's gather + SDPA); the plain loops keep them in L1. */
    const int vec = 0;
#endif
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)B);
    if (!order) return 1;
    for (int64_t b = 0; b < B; b++) {  /* insertion sort, longest first, so the dynamic schedule ends balanced */
        int64_t i = b;
        for (; i > 0 && seq_lens[order[i - 1]] < seq_lens[b]; i--) order[i] = order[i - 1];
        order[i] = b;
    }
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * Hkv; item++) {
        const int64_t b = order[item / Hkv], g = item % Hkv, len = seq_lens[b];
        const int64_t *table = block_table + b * max_blocks;
        const float *qi = q + b * q_stride + g * G * D, *kc = k_cache + g * D, *vc = v_cache + g * D;
        float *oi = out + (b * H + g * G) * D;
        if (!vec) { item_scalar(qi, kc, vc, table, len, oi, row, D, G, bs, scale); continue; }
        VEC_CASE(4, 1) VEC_CASE(4, 2) VEC_CASE(4, 3) VEC_CASE(4, 4) VEC_CASE(4, 8)
        VEC_CASE(8, 1) VEC_CASE(8, 2) VEC_CASE(8, 4) VEC_CASE(8, 8)
        item_vec(qi, kc, vc, table, len, oi, row, (int)C, (int)G, bs, scale);
    }
    free(order);
    return 0;
}

/* Llama RMSNorm of each row of x (rows x cols, row strides in elements). With residual: h = x + residual is
   normalized and also written to res_out. out = (h * rstd) * w, or h * rstd * (offset + w) with an offset. */
static void rms_norm_f32(const float *x, int64_t sx, const float *residual, int64_t sr, float *res_out, int64_t sro,
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
static void rotary_f32(float *x, int64_t sx, int64_t T, int64_t heads, int64_t D, const int64_t *positions,
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

/* Decode-sized linear layers: out [M, N] = x [M, K] (row stride sx) @ W^T (+ bias), W prepacked into panels of
   NR = 32 output features, [N / NR][K][NR] (the last panel zero-padded; the bias padded to match). Each thread
   takes whole panels; per panel, register tiles of 8 (4, 2, 1) rows x 32 features keep 16 accumulators in
   registers, one broadcast of x and two weight loads per 16 FMAs. A decode step reads every weight once,
   usually from DRAM, so while a panel is multiplied the next one is prefetched, spread evenly over the panel's
   row tiles (tile t fetches rows [pk0, pk1) of the next panel, one every K / (pk1 - pk0) iterations: a burst
   would stall on the line fill buffers). */
#define NR 32

static inline void store_row(float *o, v16 b0, v16 b1, int nw, const float *bias) {
    if (bias) { b0 += ld16(bias); b1 += ld16(bias + 16); }
    if (nw == NR) { st16(o, b0); st16(o + 16, b1); return; }
    float t[NR];
    st16(t, b0);
    st16(t + 16, b1);
    for (int j = 0; j < nw; j++) o[j] = t[j];
}

#define ROWS1(X) X(0)
#define ROWS2(X) X(0) X(1)
#define ROWS4(X) X(0) X(1) X(2) X(3)
#define ROWS8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define ACC_DECL(i) v16 p##i = {0}, q##i = {0}; const float *x##i = x + i * sx;
#define ACC_FMA(i) { const float xi = x##i[k]; p##i += xi * w0; q##i += xi * w1; }
#define ACC_STORE(i) store_row(out + i * so, p##i, q##i, nw, bias);
/* pos / step: 20-bit fixed point, so the prefetch row advances (pk1 - pk0) / K per iteration without a divide */
#define ROW_TILE(name, ROWS) \
static void name(const float *x, int64_t sx, const float *panel, const float *next, int64_t K, float *out, \
                 int64_t so, int nw, const float *bias, int64_t pk0, int64_t pk1) { \
    ROWS(ACC_DECL) \
    int64_t pos = 0; \
    const int64_t step = ((pk1 - pk0) << 20) / K; \
    for (int64_t k = 0; k < K; k++) { \
        const v16 w0 = ld16(panel + k * NR), w1 = ld16(panel + k * NR + 16); \
        if (next) { \
            const float *a = next + (pk0 + (pos >> 20)) * NR; \
            pos += step; \
            __builtin_prefetch(a); \
            __builtin_prefetch(a + 16); \
        } \
        ROWS(ACC_FMA) \
    } \
    ROWS(ACC_STORE) \
}
ROW_TILE(rows8, ROWS8)
ROW_TILE(rows4, ROWS4)
ROW_TILE(rows2, ROWS2)
ROW_TILE(rows1, ROWS1)

static void linear_panels_f32(const float *x, int64_t sx, const float *wp, const float *bias, float *out, int64_t M,
                       int64_t K, int64_t N) {
    /* Rows in chunks of MC (a chunk of x stays in the caches while every panel passes it: a prefill's thousands
       of rows would otherwise stream x from memory once per panel); the work items are (chunk, panel) pairs. */
    constexpr int64_t MC = 64;
    const int64_t panels = (N + NR - 1) / NR, chunks = (M + MC - 1) / MC;
    #pragma omp parallel for schedule(static) collapse(2)
    for (int64_t c = 0; c < chunks; c++) {
        for (int64_t pi = 0; pi < panels; pi++) {
            const int64_t m0 = c * MC, mc = M - m0 < MC ? M - m0 : MC;
            const int64_t tiles = mc / 8 + (mc % 8 >= 4) + (mc % 4 >= 2) + mc % 2;
            const float *panel = wp + pi * K * NR, *next = pi + 1 < panels ? panel + K * NR : 0;
            const int64_t n0 = pi * NR;
            const int nw = N - n0 < NR ? (int)(N - n0) : NR;
            const float *b = bias ? bias + n0 : 0;
            const float *xc = x + m0 * sx;
            float *o = out + m0 * N + n0;
            int64_t m = 0, t = 0;
#define PREFETCH_ROWS(t) K * (t) / tiles, K * ((t) + 1) / tiles
            for (; m + 8 <= mc; m += 8, t++) rows8(xc + m * sx, sx, panel, next, K, o + m * N, N, nw, b, PREFETCH_ROWS(t));
            if (mc - m >= 4) { rows4(xc + m * sx, sx, panel, next, K, o + m * N, N, nw, b, PREFETCH_ROWS(t)); m += 4; t++; }
            if (mc - m >= 2) { rows2(xc + m * sx, sx, panel, next, K, o + m * N, N, nw, b, PREFETCH_ROWS(t)); m += 2; t++; }
            if (mc - m >= 1) rows1(xc + m * sx, sx, panel, next, K, o + m * N, N, nw, b, PREFETCH_ROWS(t));
        }
    }
}

static inline float silu(float a) { return a / (1.f + expf(-a)); }

/* Gated MLP activation: out [rows, I] = silu(gate) * up, gate_up [rows, 2I] (gate first, row stride s). One
   pass instead of torch's copy, silu and multiply; exp through libmvec when available (vectorized). */
static void silu_mul_f32(const float *gate_up, int64_t s, float *out, int64_t rows, int64_t I) {
    #pragma omp parallel for schedule(static) if (rows * I > 32768)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * s, *u = g + I;
        float *o = out + r * I;
        #pragma omp simd
        for (int64_t i = 0; i < I; i++) o[i] = silu(g[i]) * u[i];
    }
}

/* Greedy sampling: idx[r] = the first index of the largest value in row r of x [rows, n] (row stride s), or
   of its first NaN, as torch.max(dim).indices. Two passes over a cache-resident row: a vector max, then the
   first match. */
static void argmax_rows_f32(const float *x, int64_t s, int64_t rows, int64_t n, int64_t *idx) {
    #pragma omp parallel for schedule(static) if (rows * n > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * s;
        float m = -INFINITY;
        int nan = 0;
        #pragma omp simd reduction(max:m) reduction(|:nan)
        for (int64_t j = 0; j < n; j++) { m = xr[j] > m ? xr[j] : m; nan |= xr[j] != xr[j]; }
        int64_t j = 0;
        if (nan) { while (xr[j] == xr[j]) j++; }
        else { while (j < n - 1 && xr[j] != m) j++; }  /* an all -inf row: index 0 */
        idx[r] = j;
    }
}

/* Constrained decoding: logits[r, j] = -inf wherever bit j of row r's token bitmask (xgrammar's layout: int32
   words, bit j % 32 of word j / 32) is 0, for each listed row r. */
static void apply_token_bitmask_f32(float *logits, int64_t sl, const int32_t *bitmask, int64_t sb,
                                    const int64_t *rows, int64_t n_rows, int64_t vocab) {
    #pragma omp parallel for schedule(static) if (n_rows * vocab > 65536)
    for (int64_t k = 0; k < n_rows; k++) {
        float *lr = logits + rows[k] * sl;
        const int32_t *br = bitmask + rows[k] * sb;
        for (int64_t w = 0; w * 32 < vocab; w++) {
            const uint32_t bits = (uint32_t)br[w];
            if (bits == 0xffffffffu) continue;
            const int64_t end = vocab - w * 32 < 32 ? vocab - w * 32 : 32;
            for (int64_t b = 0; b < end; b++)
                if (!((bits >> b) & 1u)) lr[w * 32 + b] = -INFINITY;
        }
    }
}

}  // namespace packserve
