"""Linear-attention token mixer over a step's flat tokens, with per-sequence recurrent state slots.

Packing needs no mask here: the kernel takes `cu_seqlens` over the step's sequences (fresh prompts,
chunk continuations and decodes alike) and starts each sequence from its state slot, or from zero
for a fresh prompt. The final states go back into the slots. A step where every sequence decodes
one token uses the fused recurrent step instead of the chunked kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from packserve import distributed
from packserve.layers.attention import select_rows
from packserve.layers.linear import MergedColumnLinear, RowLinear


@dataclass
class LinearAttnMeta:
    cu_seqlens: torch.Tensor  # int32 [N + 1] on device, over the step's sequences in flat order
    cu_seqlens_host: list[int]
    state_slots: torch.Tensor  # long [N]
    keep_state: torch.Tensor  # fp32 [N]: 1 where the sequence continues from its slot's state, 0 for a fresh one
    all_decode: bool  # every sequence decodes exactly one token from a saved state


class StateCache:
    """Per-layer recurrent states in fp32: S [layers, slots, Hkv, Dk, Dv], z [layers, slots, Hkv, Dk]."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, dk: int, dv: int, device):
        self.num_slots = num_slots
        self.S = torch.zeros(num_layers, num_slots, num_kv_heads, dk, dv, dtype=torch.float32, device=device)
        self.z = torch.zeros(num_layers, num_slots, num_kv_heads, dk, dtype=torch.float32, device=device)


class LinearAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, feature_map: str,
                 normalize: bool, eps: float, linear_idx: int):
        super().__init__()
        # Tensor parallel (packserve.distributed): this rank's heads, KV heads fewer than the ranks replicated; its
        # state slots hold only these heads.
        tp = distributed.tp_size()
        replicas = max(1, tp // num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads // tp, max(1, num_kv_heads // tp), head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = MergedColumnLinear(hidden, {"q": q, "k": kv, "v": kv}, replicas={"k": replicas, "v": replicas})
        self.o_proj = RowLinear(q, hidden)
        self.feature_map = feature_map  # applied inside the kernel dispatchers
        self.normalize, self.eps = normalize, eps
        self.linear_idx = linear_idx

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows`: project only these rows of the output (every token still updates its sequence's state)."""
        from packserve.kernels.linear_attention import linear_attention_chunked, linear_attention_decode_step

        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        meta: LinearAttnMeta = ctx.linear
        S_all, z_all = ctx.state_cache.S[self.linear_idx], ctx.state_cache.z[self.linear_idx]
        if meta.all_decode:
            # Updates the slots of the state pool in place.
            o, _, _ = linear_attention_decode_step(q, k, v, S_all, z_all, normalize=self.normalize, eps=self.eps,
                                                   feature_map=self.feature_map, state_indices=meta.state_slots)
        else:
            S0 = S_all.index_select(0, meta.state_slots)
            z0 = z_all.index_select(0, meta.state_slots)
            # Fresh prompts start from zero whatever their slot held before (index_select made copies).
            S0.mul_(meta.keep_state.view(-1, 1, 1, 1))
            z0.mul_(meta.keep_state.view(-1, 1, 1))
            o, (S, z) = linear_attention_chunked(q, k, v, meta.cu_seqlens, normalize=self.normalize, eps=self.eps,
                                                 initial_state=(S0, z0), output_final_state=True,
                                                 feature_map=self.feature_map, cu_seqlens_cpu=meta.cu_seqlens_host)
            S_all.index_copy_(0, meta.state_slots, S)  # states are fp32 on both sides
            z_all.index_copy_(0, meta.state_slots, z)
        return self.o_proj(select_rows(o.reshape(-1, self.q_size), rows).to(x.dtype))
