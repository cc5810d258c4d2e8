"""Llama-family decoders: Llama (GQA, llama3 rope), Mistral, Qwen2 (QKV bias), Qwen3 (q/k norm)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from packserve.layers.attention import Attention, ForwardContext, select_rows
from packserve.layers.linear import MergedColumnLinear, RowLinear
from packserve.layers.mlp import GatedMLP
from packserve.layers.norm import RMSNorm
from packserve import distributed
from packserve.layers.rotary import RotaryEmbedding
from packserve.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from packserve.models.base import CausalLM, ModelInfo, load_into, rope_config


def model_rotary(cfg: dict, max_positions: int) -> RotaryEmbedding:
    """The model's one RoPE table (every layer shares it: per-layer copies took 2 GiB at 128k x 32 layers)."""
    heads = cfg["num_attention_heads"]
    return RotaryEmbedding(cfg.get("head_dim") or cfg["hidden_size"] // heads, max_positions, rope_config(cfg))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding):
        super().__init__()
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        self.head_dim = cfg.get("head_dim") or hidden // heads
        # Tensor parallel: each rank holds heads / N query heads and kv_heads / N KV heads, or, with fewer KV heads
        # than ranks, the one KV head its query heads read (replicated over N / kv_heads ranks).
        tp = distributed.tp_size()
        kv_replicas = max(1, tp // kv_heads)
        self.num_heads, self.num_kv_heads = heads // tp, max(1, kv_heads // tp)
        q, kv = heads * self.head_dim, kv_heads * self.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedColumnLinear(hidden, {"q": q, "k": kv, "v": kv}, bias=qkv_bias,
                                           replicas={"k": kv_replicas, "v": kv_replicas})
        # Llama's attention_bias covers o_proj too; Qwen2 has q/k/v biases only.
        o_bias = bool(cfg.get("attention_bias", False)) and cfg.get("model_type") != "qwen2"
        self.o_proj = RowLinear(q, hidden, bias=o_bias)
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.rotary = rotary  # one table per model, shared by the layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, layer_idx)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows`: project only these rows of the attention output (every token's K/V is still cached)."""
        qkv = self.qkv_proj(x)
        rotate_in_place = self.q_norm is None and qkv.dtype == torch.float32
        if rotate_in_place:
            # q and k are adjacent columns of the QKV output: rotate both in place, in one pass.
            self.rotary.rotate_(positions, qkv[:, :self.q_size + self.kv_size].view(
                -1, self.num_heads + self.num_kv_heads, self.head_dim))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if not rotate_in_place:
            q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, ctx)
        return self.o_proj(select_rows(out.reshape(-1, self.q_size), rows))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding | None,
                 mixer: nn.Module | None = None):
        """`mixer` replaces softmax attention as the token mixer (the linear-attention family)."""
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = mixer if mixer is not None else LlamaAttention(cfg, layer_idx, qkv_bias, qk_norm, rotary)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = GatedMLP(cfg["hidden_size"], cfg["intermediate_size"], cfg.get("hidden_act", "silu"),
                            bias=bool(cfg.get("mlp_bias", False)))

    def forward(self, x, residual, positions, ctx, rows=None):
        """`rows`: the layer's output keeps only these rows (the model's last layer: ForwardContext.output_rows)."""
        # Residual adds are fused into the next norm (one pass over the hidden state).
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, ctx, rows)
        x, residual = self.post_attention_layernorm(x, select_rows(residual, rows))
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: dict, qkv_bias: bool, qk_norm: bool, max_positions: int,
                 mixers: dict[int, nn.Module] | None = None):
        """`mixers`: layer index -> the token mixer that replaces softmax attention there (linear attention).
        The softmax-attention layers number their KV caches 0, 1, ... in order."""
        super().__init__()
        mixers = mixers or {}
        n = cfg["num_hidden_layers"]
        self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        rotary = model_rotary(cfg, max_positions) if len(mixers) < n else None
        layers, kv_index = [], 0
        for i in range(n):
            layers.append(LlamaDecoderLayer(cfg, kv_index, qkv_bias, qk_norm, rotary, mixer=mixers.get(i)))
            kv_index += i not in mixers
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))

    def forward(self, input_ids, positions, ctx):
        x = self.embed_tokens(input_ids)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, ctx, ctx.output_rows if i == last else None)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    stacked_params = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }
    qkv_bias = False
    qk_norm = False

    def __init__(self, cfg: dict, max_model_len: int):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, self.qkv_bias or bool(cfg.get("attention_bias", False)), self.qk_norm,
                                max_model_len, self.token_mixers(cfg))
        self.tie = bool(cfg.get("tie_word_embeddings", False))
        # Vocabulary-parallel head (packserve.layers.vocab): each rank its slice of the rows, padded to equal shards.
        self.lm_head = None if self.tie else ParallelLMHead(cfg["hidden_size"], cfg["vocab_size"])
        self.info = self.model_info(cfg)

    def token_mixers(self, cfg: dict) -> dict[int, nn.Module]:
        """Layers whose token mixer is not softmax attention (none in the Llama family)."""
        return {}

    def model_info(self, cfg: dict) -> ModelInfo:
        attn = self.model.layers[0].self_attn
        return ModelInfo(
            architecture=type(self).__name__, num_layers=cfg["num_hidden_layers"], num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim, vocab_size=cfg["vocab_size"],
            max_position_embeddings=max_positions(cfg), hidden_size=cfg["hidden_size"],
            eos_token_id=cfg.get("eos_token_id"))

    def forward(self, input_ids, positions, ctx):
        return self.model(input_ids, positions, ctx)

    def tied_head_weight(self):
        return self.model.embed_tokens.weight if self.tie else None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> str | None:
            if "rotary_emb.inv_freq" in name:
                return None
            if name == "lm_head.weight" and self.tie:
                return None
            return name

        load_into(self, weights, rename, self.stacked_params)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


def max_positions(cfg: dict) -> int:
    """Usable context: position table, capped by a sliding window we do not implement."""
    n = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", cfg.get("model_type") == "mistral")
    if window and uses_window:
        n = min(n, int(window))
    return n
