"""packserve's linear-attention decoder LM (optionally hybrid with softmax-attention layers).

config.json: `architectures: ["PackserveLinearAttentionForCausalLM"]`, Llama-style sizes, plus
`feature_map` (elu1 | relu | nalaformer), `normalize`, `linear_attn_eps`, and
`softmax_attention_layers` (indices of layers that use rotary softmax attention with a paged KV
cache). Weights use Llama names. Linear layers keep a fixed-size state per sequence (state slots);
softmax layers keep paged KV blocks; a hybrid model uses both.
"""

from __future__ import annotations


from torch import nn

from packserve import distributed
from packserve.kernels.linear_attention import feature_width
from packserve.layers.linear_attention_layer import LinearAttention
from packserve.models.base import ModelInfo
from packserve.models.llama import LlamaForCausalLM


class PackserveLinearAttentionForCausalLM(LlamaForCausalLM):
    """Llama's layer stack, weight names, loading and LM head, with linear attention as the token mixer of
    every layer not listed in `softmax_attention_layers` (those keep Llama's attention, `attention_bias` included)."""

    def __init__(self, cfg: dict, max_model_len: int):
        super().__init__(cfg, max_model_len)
        self.num_linear_layers = sum(isinstance(layer.self_attn, LinearAttention) for layer in self.model.layers)
        # (Hkv, Dk', Dv) of this rank's heads: the NaLaFormer map doubles the key feature width.
        self.linear_state_shape = (self.info.num_kv_heads, feature_width(cfg.get("feature_map", "elu1"),
                                                                         self.info.head_dim), self.info.head_dim)

    def token_mixers(self, cfg: dict) -> dict[int, nn.Module]:
        n = cfg["num_hidden_layers"]
        softmax = _softmax_layers(cfg)
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        linear = [i for i in range(n) if i not in softmax]
        return {i: LinearAttention(cfg["hidden_size"], heads, kv_heads, head_dim, cfg.get("feature_map", "elu1"),
                                   bool(cfg.get("normalize", True)), float(cfg.get("linear_attn_eps", 1e-6)), slot)
                for slot, i in enumerate(linear)}

    def model_info(self, cfg: dict) -> ModelInfo:
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        return ModelInfo(
            architecture="PackserveLinearAttentionForCausalLM", num_layers=len(_softmax_layers(cfg)),
            num_kv_heads=max(1, kv_heads // distributed.tp_size()),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)), hidden_size=cfg["hidden_size"],
            eos_token_id=cfg.get("eos_token_id"))


def _softmax_layers(cfg: dict) -> list[int]:
    """The layers that keep rotary softmax attention (a paged KV cache each)."""
    n = cfg["num_hidden_layers"]
    softmax = sorted(set(cfg.get("softmax_attention_layers") or []))
    if any(not 0 <= i < n for i in softmax):
        raise ValueError(f"softmax_attention_layers {softmax} outside [0, {n})")
    return softmax
