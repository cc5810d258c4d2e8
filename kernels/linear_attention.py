"""Causal linear attention over packed sequences: public API, feature maps, dispatch.

For each sequence of a packed batch (flat tokens, boundaries in `cu_seqlens`), with phi a non-negative
feature map and the state reset at each sequence's first token (or set to a given initial state):

    S_t = S_{t-1} + phi(k_t) v_t^T          S: [Dk', Dv] per K/V head
    z_t = z_{t-1} + phi(k_t)                z: [Dk'] per K/V head
    o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)     normalize=True
    o_t = phi(q_t) S_t                               normalize=False

Layout: q [T, Hq, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv], cu_seqlens int32 [N+1]; Hq a multiple of Hkv
(GQA: query head h reads K/V head h // (Hq // Hkv), and the state lives per K/V head). Dk' is the feature
width (2 Dk for the NaLaFormer map). States: S [N, Hkv, Dk', Dv], z [N, Hkv, Dk'], always fp32.

Entry points (the dispatchers pick Triton for CUDA tensors, the vectorized torch code otherwise):
  linear_attention_chunked(q, k, v, cu_seqlens, ...) -> (o, (S, z) | None)    prefill, chunk 64
  linear_attention_decode_step(q, k, v, S, z, ...)   -> (o, S, z)             one token per sequence
Explicit paths live in `linear_attention_triton` (`*_chunked_triton`, `*_recurrent_triton`,
`*_decode_step_triton`) and `linear_attention_torch` (`*_naive`, `*_quadratic`, `*_chunked_torch`,
`*_decode_step_torch`); they take already feature-mapped q/k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from packserve.kernels.linear_attention_torch import (State, linear_attention_chunked_torch,
                                                      linear_attention_decode_step_torch, linear_attention_naive,
                                                      linear_attention_quadratic)

__all__ = ["FEATURE_MAPS", "FeatureMap", "State", "apply_feature_map", "elu1", "feature_width", "relu_map",
           "nalaformer_q", "nalaformer_k", "linear_attention_chunked", "linear_attention_decode_step",
           "linear_attention_naive", "linear_attention_quadratic"]

Phi = Callable[[torch.Tensor], torch.Tensor]
FeatureMap = str | Phi | tuple[Phi, Phi] | None


# ---- feature maps (per token only: no statistics across tokens, so they are causal) ---------------

def elu1(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, ~x + 1 for x > 0."""
    return (F.elu(x.float()) + 1.0).to(x.dtype)


def relu_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = max(x, 0)."""
    return F.relu(x)


NALA_NORM_EPS = 1e-6


def nalaformer_q(q: torch.Tensor) -> torch.Tensor:
    """NaLaFormer's query-norm-aware map (Meng et al. 2025, "NaLaFormer: Norm-Aware Linear Attention"),
    as in the authors' released code (NaLaformer/NALA.py), per token and head:

        n    = max(||q||_2, 1e-6)                   (the guard only matters for q = 0, whose features are 0)
        p(q) = 3 (0.5 + tanh(n))                    in [1.5, 4.5): a larger norm -> a larger power -> spikier
        phi(q) = [ (relu(q) / n)^p , (relu(-q) / n)^p ]     width 2 Dk, every entry in [0, 1]

    Splitting by sign keeps the features non-negative without discarding the negative coordinates; the
    positive half of phi(q) meets the positive half of phi(k) and the negative half the negative one,
    so only same-sign coordinate pairs contribute (the paper's "cosine inhibit" of opposite directions).
    Computed in fp32, returned in q's dtype."""
    x = q.float()
    n = x.norm(dim=-1, keepdim=True).clamp_min(NALA_NORM_EPS)
    p = 3.0 * (0.5 + torch.tanh(n))
    u = x / n
    return torch.cat([F.relu(u).pow(p), F.relu(-u).pow(p)], dim=-1).to(q.dtype)


def nalaformer_k(k: torch.Tensor) -> torch.Tensor:
    """NaLaFormer's key map (authors' code: k <- k^3, then the sign split):

        phi(k) = [ relu(k)^3 , relu(-k)^3 ]          width 2 Dk

    Made causal: the released (vision, bidirectional) layer divides by the mean of phi(k) over the whole
    sequence and scales by N^-1/2; here the denominator is the running sum z_t instead, and no
    sequence-length factor is used (it would cancel in the normalized form anyway)."""
    x = k.float()
    return torch.cat([F.relu(x).pow(3), F.relu(-x).pow(3)], dim=-1).to(k.dtype)


FEATURE_MAPS: dict[str, tuple[Phi, Phi]] = {
    "elu1": (elu1, elu1),
    "relu": (relu_map, relu_map),
    "nalaformer": (nalaformer_q, nalaformer_k),
}


def _resolve(feature_map: FeatureMap) -> tuple[Phi, Phi] | None:
    if feature_map is None or feature_map == "identity":
        return None
    if isinstance(feature_map, str):
        try:
            return FEATURE_MAPS[feature_map]
        except KeyError:
            raise ValueError(f"unknown feature map {feature_map!r}; known: {sorted(FEATURE_MAPS)}") from None
    if isinstance(feature_map, tuple):
        return feature_map
    return feature_map, feature_map


def apply_feature_map(q: torch.Tensor, k: torch.Tensor, feature_map: FeatureMap) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi_q(q), phi_k(k)); None / "identity" passes q and k through (already mapped)."""
    maps = _resolve(feature_map)
    return (q, k) if maps is None else (maps[0](q), maps[1](k))


def feature_width(feature_map: FeatureMap, head_dim: int) -> int:
    """Dk' of the state for a given head dim (what a cache manager allocates)."""
    return 2 * head_dim if feature_map == "nalaformer" else head_dim


# ---- dispatchers -------------------------------------------------------------------------------------

def _use_triton(*ts: torch.Tensor) -> bool:
    return all(t.is_cuda and t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in ts)


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                             normalize: bool = True, eps: float = 1e-6, initial_state: State | None = None,
                             output_final_state: bool = True, feature_map: FeatureMap = None,
                             cu_seqlens_cpu: torch.Tensor | list[int] | None = None) -> tuple[torch.Tensor, State | None]:
    """Packed causal linear attention (prefill). Returns o [T, Hq, Dv] in v's dtype and, when asked, each
    sequence's final state (S [N, Hkv, Dk', Dv], z [N, Hkv, Dk']) in fp32, ready to resume from.
    Give `cu_seqlens_cpu` (a host copy) so the chunk table is built without reading the device."""
    q, k = apply_feature_map(q, k, feature_map)
    if _use_triton(q, k, v):
        from packserve.kernels.linear_attention_triton import linear_attention_chunked_triton

        return linear_attention_chunked_triton(q, k, v, cu_seqlens, normalize=normalize, eps=eps,
                                               initial_state=initial_state, output_final_state=output_final_state,
                                               cu_seqlens_cpu=cu_seqlens_cpu)
    return linear_attention_chunked_torch(q, k, v, cu_seqlens, normalize=normalize, eps=eps,
                                          initial_state=initial_state, output_final_state=output_final_state,
                                          cu_seqlens_cpu=cu_seqlens_cpu)


def linear_attention_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
                                 *, normalize: bool = True, eps: float = 1e-6, feature_map: FeatureMap = None,
                                 state_indices: torch.Tensor | None = None,
                                 inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One new token for each of B sequences: q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv]. S/z (fp32)
    hold B states, or a pool of states addressed by `state_indices` [B] (distinct slots). In place
    (default) S/z are updated and returned; otherwise new [B, ...] states are returned."""
    q, k = apply_feature_map(q, k, feature_map)
    if _use_triton(q, k, v):
        from packserve.kernels.linear_attention_triton import linear_attention_decode_step_triton

        return linear_attention_decode_step_triton(q, k, v, S, z, normalize=normalize, eps=eps,
                                                   state_indices=state_indices, inplace=inplace)
    return linear_attention_decode_step_torch(q, k, v, S, z, normalize=normalize, eps=eps,
                                              state_indices=state_indices, inplace=inplace)
