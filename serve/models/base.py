"""What every model family provides to the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from packserve.layers.cpu_gemm import HEAD_ROWS, Calibration, CpuPackedLinear, pack
from packserve import distributed
from packserve.layers.linear import linear, whole


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts the engine needs (KV cache layout, context, vocabulary)."""

    architecture: str
    num_layers: int  # layers with a KV cache
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    eos_token_id: int | list[int] | None = None


class CausalLM(nn.Module):
    info: ModelInfo
    # HF name fragment -> (our fused module fragment, shard id): declared as data per family.
    stacked_params: dict[str, tuple[str, str]] = {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        raise NotImplementedError

    lm_head: nn.Module | None  # None when the head is tied to the input embedding
    tied_head_packed: CpuPackedLinear | None = None  # prepack_lm_head's copy of the tied head

    def tied_head_weight(self) -> torch.Tensor | None:
        """The embedding matrix the LM head is tied to, or None for an untied head (self.lm_head)."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of the rows of `hidden`. Tensor parallel: every rank calls it for the same rows; each computes
        its vocabulary slice and rank 0 gets the whole rows (the other ranks None)."""
        w = self.tied_head_weight()
        local = self.lm_head(hidden) if w is None else linear(hidden, w, packed=self.tied_head_packed)
        if distributed.tp_size() == 1:
            return local
        from packserve.layers.vocab import gather_logits

        return gather_logits(local, self.info.vocab_size)

    def prepack_lm_head(self, calibration: Calibration) -> bool:
        """A prepacked copy of a tied head for decode (an untied head is a ColumnLinear, packed with the others)."""
        w = self.tied_head_weight()
        if w is not None:
            self.tied_head_packed = pack(w, None, calibration, HEAD_ROWS)
        return self.tied_head_packed is not None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError


def rope_config(cfg: dict) -> dict:
    """Rope settings from either transformers 5's `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling` that most released checkpoints carry."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        rope.update(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            rope["rope_type"] = scaling["type"]
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        rope.update(params)
    if "partial_rotary_factor" in cfg and "partial_rotary_factor" not in rope:
        rope["partial_rotary_factor"] = cfg["partial_rotary_factor"]
    return rope


def load_into(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], rename, stacked: dict[str, tuple[str, str]],
              skip=lambda name: False) -> set[str]:
    """Copy checkpoint tensors into `model`. `rename` maps a checkpoint name to ours (or None to drop).
    Fused modules expose `.load(param, tensor, shard)` (shards load under the fused name). Raises KeyError
    when a model parameter got no tensor. Returns the names of parameters loaded."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for raw_name, tensor in weights:
        name = rename(raw_name)
        if name is None or skip(name):
            continue
        shard = None
        for frag, (fused, shard_id) in stacked.items():
            if f".{frag}." in name:
                name, shard = name.replace(f".{frag}.", f".{fused}."), shard_id
                break
        if name not in params:
            raise KeyError(f"checkpoint tensor {raw_name!r} has no matching parameter ({name!r})")
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        if hasattr(module, "load"):
            module.load(pname, tensor, shard)
        else:
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"{raw_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
            param.data.copy_(whole(tensor))
        loaded.add(name)
    missing = set(params) - loaded
    if missing:
        raise KeyError(f"checkpoint is missing weights: {sorted(missing)[:8]}")
    return loaded
