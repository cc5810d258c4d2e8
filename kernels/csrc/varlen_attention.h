/* Causal attention over packed prompts (prefill), flash-attention style on the CPU.

   Work item = (prompt, KV head, block of VQ query tokens). The G query heads of the KV head share it: their
   queries form the M = G * VQ columns of a transposed tile Q^T [D, M], and the prompt's key tiles up to the
   diagonal stream past it with an online softmax (running max m, running sum l, rescaled accumulator O^T
   [D, M]), so no score matrix is larger than a tile and no tile above the diagonal is computed. The two tile
   products, S^T = K Q^T and O^T += V^T P^T, run on oneDNN's fp32 brgemm micro-kernel
   (at::native::cpublas::brgemm: ~170-180 GFLOP/s per AVX-512 core, ~115 on AVX2; oneDNN generates it for the
   CPU it runs on). Scores are kept transposed, [keys, queries], so every softmax step is an elementwise pass over
   contiguous query columns (max, exp, sum, rescale: no per-row horizontal reductions, which cost as much as the
   products when done per query row). brgemm has no transpose and generates one kernel per shape and leading
   dimensions, so every call has one fixed shape: K and V are first repacked into VK-token tiles (V transposed),
   zero past each prompt's end.

   torch's CPU flash kernel, which one SDPA call per prompt used before, splits keys in 512-token blocks: for
   prompts shorter than that it computes the whole L x L square and masks half of it away. */
#pragma once
#include <ATen/native/CPUBlas.h>

// torch announces an fp32 brgemm with this macro (2.13 does; older releases may not): without it the operator is
// not built, and the varlen backend keeps its per-prompt SDPA path.
#ifdef CPUBLAS_BRGEMM_F32F32F32
#define PACKSERVE_HAS_VARLEN 1

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace packserve {

// Tile sizes: smaller tiles waste less work on the diagonal (a tile pair there is half masked), larger ones pay
// less per-tile overhead; 32 x 32 measured best on the serving workload (64 prompts, median ~130 tokens).
constexpr int64_t VQ = 32;  // query tokens per work item
constexpr int64_t VK = 32;  // key tokens per tile

struct VarlenShape {
    int64_t H, Hkv, D;
    int64_t sq, sk, sv;  // token strides (elements) of q, k and v; heads and dims contiguous within a token
    float scale;
};

/* Pass 1: tile t of prompt s holds its keys [t * VK, t * VK + VK) of every KV head: kp [tiles][Hkv][VK][D] and
   vt [tiles][Hkv][D][VK] (transposed), zero past the prompt's end. */
static void pack_kv_tiles(const float *k, const float *v, const int64_t *cu, const int64_t *tile0, int64_t S,
                          const VarlenShape &sh, float *kp, float *vt) {
    const int64_t D = sh.D, Hkv = sh.Hkv, tiles = tile0[S];
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t s = std::upper_bound(tile0, tile0 + S + 1, t) - tile0 - 1;
        const int64_t j0 = cu[s] + (t - tile0[s]) * VK, n = std::min<int64_t>(VK, cu[s + 1] - j0);
        for (int64_t g = 0; g < Hkv; g++) {
            float *kd = kp + (t * Hkv + g) * VK * D, *vd = vt + (t * Hkv + g) * D * VK;
            for (int64_t j = 0; j < n; j++) {
                const float *kr = k + (j0 + j) * sh.sk + g * D, *vr = v + (j0 + j) * sh.sv + g * D;
                std::memcpy(kd + j * D, kr, D * sizeof(float));
                for (int64_t d = 0; d < D; d++) vd[d * VK + j] = vr[d];
            }
            if (n < VK) {
                std::memset(kd + n * D, 0, (VK - n) * D * sizeof(float));
                for (int64_t d = 0; d < D; d++) std::memset(vd + d * VK + n, 0, (VK - n) * sizeof(float));
            }
        }
    }
}

/* The online softmax over one transposed score tile st [VK, M] (column r = query r; keys past the causal limit
   already -inf): st becomes P^T = exp(st - m), l and m are updated, and O^T's columns are rescaled where m moved.
   Every loop runs along the contiguous query columns and vectorizes. Lazy rescaling: the reference m of a column
   moves only when a score exceeds it by more than LAZY (the first tile always sets it), so later tiles rarely
   rescale O^T; softmax does not depend on the reference, and exp(s - m) <= e^LAZY keeps the sums far from fp32's
   range. On the first tile (first = true) O^T is not read: the caller's PV product overwrites it. */
constexpr float LAZY = 8.f;

static inline void softmax_tile(float *st, float *m, float *l, float *buf, float *ot, int64_t M, int64_t D,
                                bool first) {
    for (int64_t r = 0; r < M; r++) buf[r] = -INFINITY;
    for (int64_t j = 0; j < VK; j++) {
        const float *sj = st + j * M;
        #pragma omp simd
        for (int64_t r = 0; r < M; r++) buf[r] = sj[r] > buf[r] ? sj[r] : buf[r];
    }
    int moved = 0;
    #pragma omp simd reduction(|:moved)
    for (int64_t r = 0; r < M; r++) {
        const bool up = buf[r] > m[r] + LAZY;  // the first tile: m = -inf, always
        const float m_new = up ? buf[r] : m[r];
        const float alpha = expf(m[r] - m_new);  // 1 where m stays; the first tile: exp(-inf) = 0
        moved |= up;
        l[r] *= alpha;
        m[r] = m_new;
        buf[r] = alpha;  // reused: the rescale factors
    }
    for (int64_t j = 0; j < VK; j++) {
        float *sj = st + j * M;
        #pragma omp simd
        for (int64_t r = 0; r < M; r++) {
            const float p = expf(sj[r] - m[r]);
            sj[r] = p;
            l[r] += p;
        }
    }
    if (moved && !first)
        for (int64_t d = 0; d < D; d++) {
            float *od = ot + d * M;
            #pragma omp simd
            for (int64_t r = 0; r < M; r++) od[r] *= buf[r];
        }
}

/* Pass 2. q/k/v: token-major rows (strides in sh); cu [S + 1] prompt offsets; out [T, H, D] contiguous. */
static void varlen_attention_f32(const float *q, const float *k, const float *v, const int64_t *cu, int64_t S,
                                 const VarlenShape &sh, float *out) {
    const int64_t H = sh.H, Hkv = sh.Hkv, D = sh.D, G = H / Hkv, M = G * VQ;
    std::vector<int64_t> tile0(S + 1, 0);
    for (int64_t s = 0; s < S; s++) tile0[s + 1] = tile0[s] + (cu[s + 1] - cu[s] + VK - 1) / VK;
    const int64_t tile_elems = Hkv * VK * D;
    // Grown, never shrunk: a fresh multi-MB buffer per call would page-fault its way in at every layer.
    thread_local std::vector<float> scratch;
    if ((int64_t)scratch.size() < 2 * tile0[S] * tile_elems) scratch.resize(2 * tile0[S] * tile_elems);
    float *kp = scratch.data(), *vt = kp + tile0[S] * tile_elems;
    pack_kv_tiles(k, v, cu, tile0.data(), S, sh, kp, vt);

    struct Item { int64_t s, q0, g; };
    std::vector<Item> items;
    for (int64_t s = 0; s < S; s++)
        for (int64_t q0 = 0; q0 < cu[s + 1] - cu[s]; q0 += VQ)
            for (int64_t g = 0; g < Hkv; g++) items.push_back({s, q0, g});
    // Most key tiles first, so the dynamic schedule ends balanced.
    std::stable_sort(items.begin(), items.end(), [](const Item &a, const Item &b) { return a.q0 > b.q0; });
    const int64_t n_items = (int64_t)items.size();

    #pragma omp parallel
    {
        std::vector<float> qt(D * M), st(VK * M), ot(D * M), m(M), l(M), tmp(M), qpos(M);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_items; it++) {
            const Item &w = items[it];
            const int64_t start = cu[w.s], len = cu[w.s + 1] - start, nq = std::min<int64_t>(VQ, len - w.q0);
            for (int64_t h = 0; h < G; h++)  // column h * VQ + i: query token q0 + i of head g * G + h
                for (int64_t i = 0; i < VQ; i++) {
                    const int64_t r = h * VQ + i;
                    const float *src = q + (start + w.q0 + i) * sh.sq + (w.g * G + h) * D;
                    for (int64_t d = 0; d < D; d++) qt[d * M + r] = i < nq ? src[d] * sh.scale : 0.f;
                    qpos[r] = (float)(w.q0 + i);  // exact: positions < 2^24
                }
            std::fill(m.begin(), m.end(), -INFINITY);
            std::fill(l.begin(), l.end(), 0.f);
            const int64_t last = (w.q0 + nq - 1) / VK;  // the tile holding the item's last query token
            for (int64_t kb = 0; kb <= last; kb++) {
                const int64_t t = tile0[w.s] + kb;
                at::native::cpublas::brgemm(VK, M, D, D, M, M, false, kp + (t * Hkv + w.g) * VK * D, qt.data(),
                                            st.data(), false);
                if (kb * VK + VK - 1 > w.q0)  // causal: query q0 + i sees keys <= q0 + i (padding columns too)
                    for (int64_t j = 0; j < VK; j++) {
                        float *sj = st.data() + j * M;
                        const float key = (float)(kb * VK + j);
                        #pragma omp simd
                        for (int64_t r = 0; r < M; r++) sj[r] = key > qpos[r] ? -INFINITY : sj[r];
                    }
                softmax_tile(st.data(), m.data(), l.data(), tmp.data(), ot.data(), M, D, kb == 0);
                at::native::cpublas::brgemm(D, M, VK, VK, M, M, kb > 0, vt + (t * Hkv + w.g) * D * VK, st.data(),
                                            ot.data(), false);
            }
            for (int64_t h = 0; h < G; h++)
                for (int64_t i = 0; i < nq; i++) {
                    const int64_t r = h * VQ + i;
                    const float inv = 1.f / l[r];
                    float *dst = out + ((start + w.q0 + i) * H + w.g * G + h) * D;
                    for (int64_t d = 0; d < D; d++) dst[d] = ot[d * M + r] * inv;
                }
        }
        at::native::cpublas::brgemm_release(false);
    }
}

}  // namespace packserve

#endif  // CPUBLAS_BRGEMM_F32F32F32
