/* Linear layers on oneDNN's fp32 brgemm micro-kernel (at::native::cpublas::brgemm), over the same 32-feature
   weight panels as the hand-written panel GEMM (cpu_kernels.h): out [M, N] = x [M, K] W^T + bias.

   oneDNN generates the micro-kernel at run time for the CPU it runs on (AVX-512, AVX2, ...: ONEDNN_MAX_CPU_ISA
   caps it), so one build serves every ISA without the register spills a fixed hand-written tile suffers on AVX2
   (measured on 2 cores, AVX2-capped: 0.2-0.9x of MKL's time at decode and prefill sizes, where the AVX-512 panel
   tiles spilled to 5-60x). Work item = (tile of MB rows, panel); each is one brgemm call writing its [MB, 32] tile
   of out in place (the last panel, when N is not a multiple of 32, through a small buffer), then the bias. Which
   linears use it, per weight shape and row count, is measured at start-up (packserve.layers.cpu_gemm). */
#pragma once
#include <ATen/native/CPUBlas.h>

#ifdef CPUBLAS_BRGEMM_F32F32F32
#define PACKSERVE_HAS_BRGEMM_LINEAR 1

#include <algorithm>
#include <cstdint>

#include "cpu_kernels.h"  // silu

namespace packserve {

constexpr int64_t BRGEMM_NR = 32;  // output features per panel (the panel GEMM's NR)

static void linear_brgemm_f32(const float *x, int64_t sx, const float *wp, const float *bias, float *out, int64_t M,
                              int64_t K, int64_t N) {
    // Taller tiles for large inputs (prefill): fewer calls, each weight panel reused over more rows.
    const int64_t MB = M >= 256 ? 64 : 32;
    const int64_t panels = (N + BRGEMM_NR - 1) / BRGEMM_NR, tiles = (M + MB - 1) / MB;
    #pragma omp parallel
    {
        float tail[64 * BRGEMM_NR];
        #pragma omp for schedule(static) collapse(2)
        for (int64_t t = 0; t < tiles; t++) {
            for (int64_t p = 0; p < panels; p++) {
                const int64_t m0 = t * MB, mb = std::min(MB, M - m0), n0 = p * BRGEMM_NR;
                const int64_t nw = std::min(BRGEMM_NR, N - n0);
                float *c = nw == BRGEMM_NR ? out + m0 * N + n0 : tail;
                const int64_t ldc = nw == BRGEMM_NR ? N : BRGEMM_NR;
                at::native::cpublas::brgemm(mb, BRGEMM_NR, K, sx, BRGEMM_NR, ldc, false, x + m0 * sx,
                                            wp + p * K * BRGEMM_NR, c);
                for (int64_t r = 0; r < mb; r++) {
                    float *o = out + (m0 + r) * N + n0;
                    if (nw < BRGEMM_NR) std::copy(tail + r * BRGEMM_NR, tail + r * BRGEMM_NR + nw, o);
                    if (bias) {
                        #pragma omp simd
                        for (int64_t j = 0; j < nw; j++) o[j] += bias[n0 + j];
                    }
                }
            }
        }
        at::native::cpublas::brgemm_release(false);
    }
}

/* The gated MLP's first half in one pass: out [M, I] = silu(x W_gate^T + b_gate) * (x W_up^T + b_up), with the
   fused gate_up weight [2I, K] in panels (gate's I / 32 panels first, then up's; I a multiple of 32). A work
   item multiplies gate panel p and up panel p into two cache-resident [MB, 32] tiles and writes only their
   product: the [M, 2I] gate_up tensor is never written to memory and read back (measured on 2 AMD EPYC cores,
   silu_mul alone took ~3% of a prefill). */
static void linear_brgemm_silu_mul_f32(const float *x, int64_t sx, const float *wp, const float *bias, float *out,
                                       int64_t M, int64_t K, int64_t I) {
    const int64_t MB = M >= 256 ? 64 : 32;
    const int64_t pairs = I / BRGEMM_NR, tiles = (M + MB - 1) / MB;
    #pragma omp parallel
    {
        float g[64 * BRGEMM_NR], u[64 * BRGEMM_NR];
        #pragma omp for schedule(static) collapse(2)
        for (int64_t t = 0; t < tiles; t++) {
            for (int64_t p = 0; p < pairs; p++) {
                const int64_t m0 = t * MB, mb = std::min(MB, M - m0), n0 = p * BRGEMM_NR;
                at::native::cpublas::brgemm(mb, BRGEMM_NR, K, sx, BRGEMM_NR, BRGEMM_NR, false, x + m0 * sx,
                                            wp + p * K * BRGEMM_NR, g);
                at::native::cpublas::brgemm(mb, BRGEMM_NR, K, sx, BRGEMM_NR, BRGEMM_NR, false, x + m0 * sx,
                                            wp + (pairs + p) * K * BRGEMM_NR, u);
                const float *bg = bias ? bias + n0 : nullptr, *bu = bias ? bias + I + n0 : nullptr;
                for (int64_t r = 0; r < mb; r++) {
                    const float *gr = g + r * BRGEMM_NR, *ur = u + r * BRGEMM_NR;
                    float *o = out + (m0 + r) * I + n0;
                    #pragma omp simd
                    for (int64_t j = 0; j < BRGEMM_NR; j++) {
                        const float a = bg ? gr[j] + bg[j] : gr[j], b = bu ? ur[j] + bu[j] : ur[j];
                        o[j] = silu(a) * b;
                    }
                }
            }
        }
        at::native::cpublas::brgemm_release(false);
    }
}

}  // namespace packserve
#endif
