"""The CPU kernels' Python entry points: paged decode attention, packed-prefill attention, fused (add +) RMSNorm,
RoPE, silu*mul, argmax, and decode-sized linear layers.

On CPU a decode step is a few memory-bound matmuls plus ~100 small ops; torch runs each small op as several
passes (RMSNorm: square, mean, rsqrt, two multiplies) with a dispatch each, and its paged-attention path
gathers every request's KV blocks into a padded copy before SDPA reads it again. These kernels do each job in
one pass over the data:

- `paged_decode_attention`: one query token per request; each cached K/V row is read once, in place in its
  block, for the G query heads that share it (GQA): s_j = scale * q . k_j (j < len), p = softmax(s),
  out = sum_j p_j v_j.
- `varlen_attention`: causal attention within each packed prompt (prefill), up to the diagonal only, in 256-key
  chunks on oneDNN's brgemm micro-kernel (kernels/csrc/varlen_attention.h); `paged_prefill_attention`: the same
  loops for new tokens behind a cached context (chunk continuations, prefix-cache hits), keys read from the
  paged cache through the block table.
- `rms_norm`: Llama RMSNorm (fp32 statistics, then times weight or offset + weight), optionally after the residual
  add (`residual=`), whose sum is also returned.
- `rotary_`: rotate-half RoPE in place on q and k (strided views of the fused QKV output).
- `silu_mul`: the gated MLP's silu(gate) * up in one pass; `argmax_rows`: greedy sampling's row argmax;
  `apply_token_bitmask_`: constrained decoding's token mask (packserve.engine.structured).
- `pack_linear` / `linear_packed` / `linear_brgemm`: linear layers on weights prepacked into 32-feature panels,
  either hand-written (register-tiled, the next panel prefetched while one is multiplied) or on oneDNN's brgemm
  micro-kernel (generated for the running CPU); each used per weight shape and row count only where it measured
  faster than MKL, the faster of the two where both do (packserve.layers.cpu_gemm). `linear_brgemm_silu_mul`:
  the gated MLP's gate_up product and silu(gate) * up in one pass on brgemm (where brgemm serves gate_up).

KV-cache writes stay on torch's index_copy_, which was as fast as a C loop (benchmarks/cpu_ops.py).

The kernels are torch operators (torch.ops.packserve_avx512 / packserve_avx2, with fake implementations) built
from kernels/csrc by packserve.kernels.cpu_lib; the operators check shapes, strides and index ranges, so a bad
call raises instead of reading out of bounds. `available()` is False until they are built (never on a CPU
without AVX2 or without a compiler and a prebuilt library); callers then keep their torch paths. Each kernel has
a pure-torch reference the tests compare with (`packserve.kernels.paged_attention_triton.paged_decode_ref`,
`packserve.kernels.rmsnorm`, `packserve.layers.rotary`, per-prompt causal SDPA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from packserve.kernels.cpu_lib import available, ops

__all__ = ["PanelWeight", "apply_token_bitmask_", "argmax_rows", "available", "has_brgemm_linear", "has_varlen",
           "linear_brgemm", "linear_brgemm_silu_mul", "linear_packed", "pack_linear", "paged_decode_attention",
           "paged_prefill_attention",
           "rms_norm", "rotary_", "silu_mul", "usable", "varlen_attention"]

PANEL = 32  # output features per weight panel (NR in the C source)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    """q: [B, H, D] fp32 (rows may be strided, heads and dims contiguous); k/v_cache: [slots, Hkv, D] fp32
    contiguous, slot = block * block_size + offset; block_table: int64 [B, max_blocks]; seq_lens: int64 [B]
    (context length including the current token). Returns [B, H, D]."""
    return ops().paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, block_size, scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal attention within each prompt of a packed batch. q: [T, H, D], k/v: [T, Hkv, D] fp32 (token rows
    may be strided, e.g. column slices of the fused QKV output; heads and dims contiguous); cu_seqlens: int64
    [prompts + 1], 0 first and T last. Returns a new [T, H, D]."""
    return ops().varlen_attention(q, k, v, cu_seqlens, scale)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, q_starts: torch.Tensor,
                            q_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Requests whose q_lens[b] new tokens (q rows q_starts[b]..., fp32 [T, H, D], token rows may be strided) are
    the last of their seq_lens[b] tokens, every K/V already in the caches ([slots, Hkv, D] contiguous) at the
    slots of block_table's row b (int64 [B, max_blocks]); causal, query i at position seq_len - q_len + i. All
    int64 [B]. Returns [sum(q_lens), H, D]: the requests' queries in order. Built with `varlen_attention`."""
    return ops().paged_prefill_attention(q, k_cache, v_cache, block_table, seq_lens, q_starts, q_lens, block_size,
                                         scale)


def has_varlen() -> bool:
    """The packed-prefill attention operators (varlen_attention, paged_prefill_attention) are built (they need
    torch's fp32 brgemm, CPUBLAS_BRGEMM_F32F32F32)."""
    return available() and hasattr(ops(), "varlen_attention")


def usable(*tensors: torch.Tensor) -> bool:
    """The dispatchers' rule: CPU fp32 tensors and the kernels built."""
    for t in tensors:
        if not t.is_cpu or t.dtype is not torch.float32:
            return False
    return available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or with residual (norm(x + residual), x + residual); fp32 CPU tensors, new outputs."""
    if residual is None:
        return ops().rms_norm(x, weight, eps, offset)
    return ops().add_rms_norm(x, residual, weight, eps, offset)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on x: [T, heads, D] (token stride free, heads and dims contiguous); positions int64 [T];
    cos/sin: [max_pos, rot/2]."""
    ops().rotary_(x, positions, cos, sin)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[r, j] = -inf where bit j of bitmask[r] (int32 words, xgrammar's layout) is 0, for each r
    in rows (int64)."""
    ops().apply_token_bitmask_(logits, bitmask, rows)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2I] fp32 (gate first; rows may be strided) -> new [rows, I] = silu(gate) * up."""
    return ops().silu_mul(gate_up)


def argmax_rows(x: torch.Tensor) -> list[int]:
    """Per row of x [rows, n] fp32 (n >= 1): the first index of its maximum (of its first NaN if any), as
    torch.max(dim=-1).indices."""
    return ops().argmax_rows(x).tolist()


@dataclass(frozen=True)
class PanelWeight:
    """A linear weight [out, in] packed for `linear_packed`: panels [ceil(out / 32), in, 32] (the last one
    zero-padded) and the bias zero-padded to the panels' width."""
    panels: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PanelWeight:
    """weight: fp32 CPU [out, in] (nn.Linear layout); bias: [out] or None. A copy: the originals stay."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or not weight.is_cpu:
        raise ValueError("pack_linear takes a 2-D fp32 CPU weight")
    n, k = weight.shape
    if bias is not None and bias.shape != (n,):
        raise ValueError("bias must have one value per output feature")
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k)
    padded[:n] = weight
    b = None
    if bias is not None:
        b = torch.zeros(panels * PANEL)
        b[:n] = bias
    return PanelWeight(padded.view(panels, PANEL, k).transpose(1, 2).contiguous(), b, n, k)


def linear_packed(x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
    """x [M, in] fp32 (rows may be strided) @ weight^T + bias -> new [M, out]: the hand-written panel GEMM."""
    return ops().linear_panels(x, w.panels, w.bias, w.out_features)


def has_brgemm_linear() -> bool:
    """`linear_brgemm` is built (it needs torch's fp32 brgemm, CPUBLAS_BRGEMM_F32F32F32)."""
    return available() and hasattr(ops(), "linear_brgemm")


def linear_brgemm(x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
    """The same product as `linear_packed` on the same panels, with oneDNN's brgemm micro-kernel
    (kernels/csrc/brgemm_linear.h)."""
    return ops().linear_brgemm(x, w.panels, w.bias, w.out_features)


def linear_brgemm_silu_mul(x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
    """silu(gate) * up of the fused gate_up linear in one pass (`linear_brgemm`'s product, then the activation
    on cache-resident tiles): w holds gate_up [2I, in] with I a multiple of 32; returns [M, I]."""
    return ops().linear_brgemm_silu_mul(x, w.panels, w.bias, w.out_features)
