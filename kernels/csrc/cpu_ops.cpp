// The CPU kernels as torch operators: schemas, argument checks and outputs here, the loops in cpu_kernels.h and
// varlen_attention.h. Built once per ISA level by packserve.kernels.cpu_lib (torch.utils.cpp_extension); the
// level names the namespace (PACKSERVE_NS = packserve_avx512 or packserve_avx2), so both variants can be loaded
// in one process and tested side by side. Every check that guards memory (shapes, strides, index ranges) is here,
// so a wrong call raises instead of reading out of bounds; they cost a few integer compares per call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "brgemm_linear.h"
#include "cpu_kernels.h"
#include "varlen_attention.h"

namespace {

using at::Tensor;

void check_f32(const Tensor &t, const char *name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be an fp32 CPU tensor");
}

void check_i64(const Tensor &t, const char *name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong, name, " must be an int64 CPU tensor");
}

// x as [rows, cols] with one row stride (no copy when the last dim is contiguous and the rows collapse).
Tensor as_rows(const Tensor &x, const char *name) {
    check_f32(x, name);
    TORCH_CHECK(x.dim() >= 1, name, " needs at least one dimension");
    Tensor y = x.stride(-1) == 1 ? x : x.contiguous();
    y = y.reshape({-1, x.size(-1)});
    TORCH_CHECK(y.size(0) <= 1 || y.stride(0) >= y.size(1), name, " must have a row layout");
    return y;
}

const float *opt_ptr(const std::optional<Tensor> &t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

Tensor norm_weight(const std::optional<Tensor> &w, int64_t cols) {
    if (!w.has_value()) return Tensor();
    check_f32(*w, "weight");
    TORCH_CHECK(w->dim() == 1 && w->size(0) == cols, "weight must have one value per column");
    return w->contiguous();
}

Tensor rms_norm(const Tensor &x, const std::optional<Tensor> &weight, double eps, double offset) {
    const Tensor x2 = as_rows(x, "x"), w = norm_weight(weight, x.size(-1));
    Tensor out = at::empty(x.sizes(), x.options());
    if (x2.numel())
        packserve::rms_norm_f32(x2.data_ptr<float>(), x2.stride(0), nullptr, 0, nullptr, 0,
                                w.defined() ? w.data_ptr<float>() : nullptr, out.data_ptr<float>(), x2.size(1),
                                x2.size(0), x2.size(1), (float)eps, (float)offset);
    return out;
}

std::tuple<Tensor, Tensor> add_rms_norm(const Tensor &x, const Tensor &residual, const std::optional<Tensor> &weight,
                                        double eps, double offset) {
    TORCH_CHECK(residual.sizes() == x.sizes(), "residual must match x");
    const Tensor x2 = as_rows(x, "x"), r2 = as_rows(residual, "residual"), w = norm_weight(weight, x.size(-1));
    Tensor out = at::empty(x.sizes(), x.options()), sum = at::empty(x.sizes(), x.options());
    if (x2.numel())
        packserve::rms_norm_f32(x2.data_ptr<float>(), x2.stride(0), r2.data_ptr<float>(), r2.stride(0),
                                sum.data_ptr<float>(), x2.size(1), w.defined() ? w.data_ptr<float>() : nullptr,
                                out.data_ptr<float>(), x2.size(1), x2.size(0), x2.size(1), (float)eps, (float)offset);
    return {out, sum};
}

void rotary_(const Tensor &x, const Tensor &positions, const Tensor &cos, const Tensor &sin) {
    check_f32(x, "x");
    TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be [T, heads, D] with heads and dims contiguous");
    check_i64(positions, "positions");
    check_f32(cos, "cos");
    check_f32(sin, "sin");
    const int64_t T = x.size(0), half = cos.size(1);
    TORCH_CHECK(positions.dim() == 1 && positions.size(0) == T, "positions must be [T]");
    TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && 2 * half <= x.size(2), "cos/sin must be [max_pos, rot / 2]");
    const Tensor pos = positions.contiguous(), c = cos.contiguous(), s = sin.contiguous();
    const int64_t *p = pos.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; t++) TORCH_CHECK(p[t] >= 0 && p[t] < c.size(0), "position beyond the rotary table");
    if (T)
        packserve::rotary_f32(x.data_ptr<float>(), x.stride(0), T, x.size(1), x.size(2), p, c.data_ptr<float>(),
                              s.data_ptr<float>(), 2 * half);
}

Tensor silu_mul(const Tensor &gate_up) {
    TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [rows, 2 * intermediate]");
    const Tensor x = as_rows(gate_up, "gate_up");
    const int64_t rows = x.size(0), inter = x.size(1) / 2;
    Tensor out = at::empty({rows, inter}, x.options());
    if (rows) packserve::silu_mul_f32(x.data_ptr<float>(), x.stride(0), out.data_ptr<float>(), rows, inter);
    return out;
}

Tensor argmax_rows(const Tensor &x) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1, "x must be [rows, n >= 1]");
    const Tensor x2 = as_rows(x, "x");
    Tensor idx = at::empty({x2.size(0)}, x.options().dtype(at::kLong));
    if (x2.size(0)) packserve::argmax_rows_f32(x2.data_ptr<float>(), x2.stride(0), x2.size(0), x2.size(1), idx.data_ptr<int64_t>());
    return idx;
}

// Both linear kernels read weights packed into 32-feature panels [P, in, 32] (the last one and the bias
// zero-padded): checks and output here, the product by `kernel`. out_cols: the output's width (out_features unless the kernel reduces the features, as silu(gate) * up does).
template <typename Kernel>
Tensor panel_linear(const Tensor &x, const Tensor &panels, const std::optional<Tensor> &bias, int64_t out_features,
                    Kernel kernel, int64_t out_cols = -1) {
    check_f32(panels, "panels");
    TORCH_CHECK(panels.dim() == 3 && panels.size(2) == NR && panels.is_contiguous(), "panels must be contiguous [P, in, 32]");
    TORCH_CHECK(out_features > 0 && (out_features + NR - 1) / NR == panels.size(0), "out_features does not match the panels");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == panels.size(1), "x must be [M, in]");
    if (bias.has_value()) {
        check_f32(*bias, "bias");
        TORCH_CHECK(bias->is_contiguous() && bias->numel() == panels.size(0) * NR, "bias must be padded to the panels");
    }
    const Tensor x2 = as_rows(x, "x");
    Tensor out = at::empty({x2.size(0), out_cols < 0 ? out_features : out_cols}, x.options());
    if (x2.size(0))
        kernel(x2.data_ptr<float>(), x2.stride(0), panels.data_ptr<float>(), opt_ptr(bias), out.data_ptr<float>(),
               x2.size(0), x2.size(1), out_features);
    return out;
}

Tensor linear_panels(const Tensor &x, const Tensor &panels, const std::optional<Tensor> &bias, int64_t out_features) {
    return panel_linear(x, panels, bias, out_features, packserve::linear_panels_f32);
}

#ifdef PACKSERVE_HAS_BRGEMM_LINEAR
static_assert(packserve::BRGEMM_NR == NR, "both linear kernels read the same panels");

Tensor linear_brgemm(const Tensor &x, const Tensor &panels, const std::optional<Tensor> &bias, int64_t out_features) {
    return panel_linear(x, panels, bias, out_features, packserve::linear_brgemm_f32);
}

// out_features: the fused gate_up width 2I (gate first); returns silu(gate) * up, [M, I].
Tensor linear_brgemm_silu_mul(const Tensor &x, const Tensor &panels, const std::optional<Tensor> &bias,
                              int64_t out_features) {
    TORCH_CHECK(out_features % (2 * NR) == 0, "linear_brgemm_silu_mul needs gate and up widths that are multiples of 32");
    const int64_t I = out_features / 2;
    auto kernel = [I](const float *x, int64_t sx, const float *wp, const float *b, float *out, int64_t M, int64_t K,
                      int64_t) { packserve::linear_brgemm_silu_mul_f32(x, sx, wp, b, out, M, K, I); };
    return panel_linear(x, panels, bias, out_features, kernel, I);
}
#endif

void apply_token_bitmask_(const Tensor &logits, const Tensor &bitmask, const Tensor &rows) {
    check_f32(logits, "logits");
    TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [B, V] with contiguous rows");
    TORCH_CHECK(bitmask.device().is_cpu() && bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 &&
                bitmask.stride(1) == 1, "bitmask must be an int32 CPU [B, words] tensor");
    const int64_t vocab = logits.size(1);
    TORCH_CHECK(bitmask.size(1) * 32 >= vocab, "bitmask has fewer bits than the vocabulary");
    check_i64(rows, "rows");
    const Tensor r = rows.contiguous();
    const int64_t *rp = r.data_ptr<int64_t>();
    for (int64_t k = 0; k < r.numel(); k++)
        TORCH_CHECK(rp[k] >= 0 && rp[k] < logits.size(0) && rp[k] < bitmask.size(0), "a row is outside logits");
    packserve::apply_token_bitmask_f32(logits.data_ptr<float>(), logits.stride(0), bitmask.data_ptr<int32_t>(),
                                       bitmask.stride(0), rp, r.numel(), vocab);
}

// The D contiguous values of each head and the heads of a token contiguous, tokens at any stride.
void check_token_rows(const Tensor &t, const char *name) {
    check_f32(t, name);
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2) && (t.size(0) <= 1 || t.stride(0) >= t.size(1) * t.size(2)),
                name, " must be [tokens, heads, D] with heads and dims contiguous");
}

// q rows and the paged caches ([slots, Hkv, D] contiguous, whole blocks) of the paged attention operators.
void check_paged_inputs(const Tensor &q, const Tensor &k_cache, const Tensor &v_cache, int64_t block_size) {
    check_token_rows(q, "q");
    check_f32(k_cache, "k_cache");
    check_f32(v_cache, "v_cache");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
                "the caches must be contiguous [slots, kv heads, D]");
    const int64_t Hkv = k_cache.size(1);
    TORCH_CHECK(k_cache.size(2) == q.size(2) && Hkv > 0 && q.size(1) % Hkv == 0, "shape mismatch between q and the caches");
    TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0, "the caches must hold whole blocks");
}

Tensor paged_decode_attention(const Tensor &q, const Tensor &k_cache, const Tensor &v_cache, const Tensor &block_table,
                              const Tensor &seq_lens, int64_t block_size, double scale) {
    check_paged_inputs(q, k_cache, v_cache, block_size);
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
    check_i64(block_table, "block_table");
    check_i64(seq_lens, "seq_lens");
    TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && seq_lens.dim() == 1 && seq_lens.size(0) == B,
                "block_table and seq_lens need one row per request");
    const Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
    const int64_t max_blocks = table.size(1), n_blocks = k_cache.size(0) / block_size;
    const int64_t *tp = table.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++) {
        TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * block_size, "a sequence length is outside its block table");
        for (int64_t j = 0; j < (lp[b] + block_size - 1) / block_size; j++)
            TORCH_CHECK(tp[b * max_blocks + j] >= 0 && tp[b * max_blocks + j] < n_blocks, "a block id is outside the cache");
    }
    Tensor out = at::empty({B, H, D}, q.options());
    if (B) {
        const int failed = packserve::paged_decode_attention(
            q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tp, max_blocks, lp,
            out.data_ptr<float>(), B, H, Hkv, D, block_size, (float)scale);
        TORCH_CHECK(!failed, "paged decode attention: allocation failed");
    }
    return out;
}

#ifdef PACKSERVE_HAS_VARLEN
Tensor varlen_attention(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &cu_seqlens, double scale) {
    check_token_rows(q, "q");
    check_token_rows(k, "k");
    check_token_rows(v, "v");
    const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
    TORCH_CHECK(k.size(0) == T && v.sizes() == k.sizes() && k.size(2) == D && Hkv > 0 && H % Hkv == 0,
                "q, k and v must be [T, H, D], [T, Hkv, D], [T, Hkv, D] with H a multiple of Hkv");
    check_i64(cu_seqlens, "cu_seqlens");
    TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, "cu_seqlens must be [prompts + 1]");
    const Tensor cu = cu_seqlens.contiguous();
    const int64_t *c = cu.data_ptr<int64_t>(), S = cu.size(0) - 1;
    TORCH_CHECK(c[0] == 0 && c[S] == T, "cu_seqlens must run from 0 to the token count");
    for (int64_t s = 0; s < S; s++) TORCH_CHECK(c[s + 1] > c[s], "every prompt needs at least one token");
    Tensor out = at::empty({T, H, D}, q.options());
    if (T) {
        const packserve::VarlenShape sh{H, Hkv, D, q.stride(0), k.stride(0), v.stride(0), (float)scale};
        packserve::varlen_attention_f32(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), c, S, sh,
                                        out.data_ptr<float>());
    }
    return out;
}

Tensor paged_prefill_attention(const Tensor &q, const Tensor &k_cache, const Tensor &v_cache, const Tensor &block_table,
                               const Tensor &seq_lens, const Tensor &q_starts, const Tensor &q_lens, int64_t block_size,
                               double scale) {
    check_paged_inputs(q, k_cache, v_cache, block_size);
    const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
    for (const Tensor *t : {&block_table, &seq_lens, &q_starts, &q_lens}) check_i64(*t, "block_table / lengths");
    const int64_t S = seq_lens.numel();
    TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == S && seq_lens.dim() == 1 && q_starts.dim() == 1 &&
                q_lens.dim() == 1 && q_starts.size(0) == S && q_lens.size(0) == S,
                "block_table, seq_lens, q_starts and q_lens need one row per request");
    const Tensor table = block_table.contiguous(), lens = seq_lens.contiguous(), qs = q_starts.contiguous(),
                 ql = q_lens.contiguous();
    const int64_t width = table.size(1), n_blocks = k_cache.size(0) / block_size;
    const int64_t *tp = table.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>(), *sp = qs.data_ptr<int64_t>(),
                  *np = ql.data_ptr<int64_t>();
    int64_t rows = 0;
    for (int64_t s = 0; s < S; s++) {
        TORCH_CHECK(np[s] >= 1 && lp[s] >= np[s] && lp[s] <= width * block_size,
                    "each request needs 1 <= q_len <= seq_len <= its block table's slots");
        TORCH_CHECK(sp[s] >= 0 && sp[s] + np[s] <= T, "a request's query rows are outside q");
        for (int64_t j = 0; j < (lp[s] + block_size - 1) / block_size; j++)
            TORCH_CHECK(tp[s * width + j] >= 0 && tp[s * width + j] < n_blocks, "a block id is outside the cache");
        rows += np[s];
    }
    Tensor out = at::empty({rows, H, D}, q.options());
    if (rows) {
        const packserve::VarlenShape sh{H, Hkv, D, q.stride(0), Hkv * D, Hkv * D, (float)scale};
        packserve::paged_prefill_attention_f32(q.data_ptr<float>(), k_cache.data_ptr<float>(),
                                               v_cache.data_ptr<float>(), tp, width, block_size, sp, np, lp, S, sh,
                                               out.data_ptr<float>());
    }
    return out;
}
#endif

}  // namespace

#define PACKSERVE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands PACKSERVE_NS before TORCH_LIBRARY pastes it
#define PACKSERVE_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

PACKSERVE_LIBRARY(PACKSERVE_NS, m) {
    m.def("rms_norm(Tensor x, Tensor? weight, float eps, float offset) -> Tensor");
    m.def("add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps, float offset) -> (Tensor, Tensor)");
    m.def("rotary_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin) -> ()");
    m.def("silu_mul(Tensor gate_up) -> Tensor");
    m.def("argmax_rows(Tensor x) -> Tensor");
    m.def("linear_panels(Tensor x, Tensor panels, Tensor? bias, int out_features) -> Tensor");
#ifdef PACKSERVE_HAS_BRGEMM_LINEAR
    m.def("linear_brgemm(Tensor x, Tensor panels, Tensor? bias, int out_features) -> Tensor");
    m.def("linear_brgemm_silu_mul(Tensor x, Tensor panels, Tensor? bias, int out_features) -> Tensor");
#endif
    m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> ()");
    m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
          "int block_size, float scale) -> Tensor");
#ifdef PACKSERVE_HAS_VARLEN
    m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale) -> Tensor");
    m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
          "Tensor q_starts, Tensor q_lens, int block_size, float scale) -> Tensor");
#endif
}

PACKSERVE_LIBRARY_IMPL(PACKSERVE_NS, m) {
    m.impl("rms_norm", &rms_norm);
    m.impl("add_rms_norm", &add_rms_norm);
    m.impl("rotary_", &rotary_);
    m.impl("silu_mul", &silu_mul);
    m.impl("argmax_rows", &argmax_rows);
    m.impl("linear_panels", &linear_panels);
#ifdef PACKSERVE_HAS_BRGEMM_LINEAR
    m.impl("linear_brgemm", &linear_brgemm);
    m.impl("linear_brgemm_silu_mul", &linear_brgemm_silu_mul);
#endif
    m.impl("apply_token_bitmask_", &apply_token_bitmask_);
    m.impl("paged_decode_attention", &paged_decode_attention);
#ifdef PACKSERVE_HAS_VARLEN
    m.impl("varlen_attention", &varlen_attention);
    m.impl("paged_prefill_attention", &paged_prefill_attention);
#endif
}
