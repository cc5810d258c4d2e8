"""Fake (meta) implementations of the CPU operators (kernels/csrc/cpu_ops.cpp): output shapes and dtypes without
running them, so torch.compile and FakeTensor tracing see through the calls. Registered for each ISA namespace
when packserve.kernels.cpu_lib loads it."""

from __future__ import annotations

import torch


def register(ns: str) -> None:
    def fake(name):
        if not hasattr(getattr(torch.ops, ns), name):  # an operator this torch could not build (varlen_attention)
            return lambda fn: fn
        return torch.library.register_fake(f"{ns}::{name}")

    @fake("rms_norm")
    def _rms_norm(x, weight, eps, offset):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @fake("add_rms_norm")
    def _add_rms_norm(x, residual, weight, eps, offset):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))

    @fake("rotary_")
    def _rotary(x, positions, cos, sin):
        return None

    @fake("silu_mul")
    def _silu_mul(gate_up):
        return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)

    @fake("argmax_rows")
    def _argmax_rows(x):
        return x.new_empty(x.shape[0], dtype=torch.int64)

    @fake("apply_token_bitmask_")
    def _bitmask(logits, bitmask, rows):
        return None

    @fake("linear_panels")
    def _linear_panels(x, panels, bias, out_features):
        return x.new_empty(x.shape[0], out_features)

    @fake("linear_brgemm")
    def _linear_brgemm(x, panels, bias, out_features):
        return x.new_empty(x.shape[0], out_features)

    @fake("linear_brgemm_silu_mul")
    def _linear_brgemm_silu_mul(x, panels, bias, out_features):
        return x.new_empty(x.shape[0], out_features // 2)

    @fake("paged_decode_attention")
    def _paged(q, k_cache, v_cache, block_table, seq_lens, block_size, scale):
        return q.new_empty(q.shape)

    @fake("varlen_attention")
    def _varlen(q, k, v, cu_seqlens, scale):
        return q.new_empty(q.shape)

    @fake("paged_prefill_attention")
    def _paged_prefill(q, k_cache, v_cache, block_table, seq_lens, q_starts, q_lens, block_size, scale):
        return q.new_empty(torch.library.get_ctx().new_dynamic_size(), q.shape[1], q.shape[2])
