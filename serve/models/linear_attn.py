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
from packserve.layers.linear_attention import LinearAttention
from packserve.layers.norm import RMSNorm
from packserve.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from packserve.models.base import CausalLM, ModelInfo
from packserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, model_rotary


class PackserveLinearAttentionForCausalLM(LlamaForCausalLM):
    """Llama's weight names, loading and LM head; its own layer stack (mixers chosen per layer)."""

    def __init__(self, cfg: dict, max_model_len: int):
        CausalLM.__init__(self)
        self.cfg = cfg
        n = cfg["num_hidden_layers"]
        softmax = sorted(set(cfg.get("softmax_attention_layers") or []))
        if any(not 0 <= i < n for i in softmax):
            raise ValueError(f"softmax_attention_layers {softmax} outside [0, {n})")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        layers, n_lin = [], 0
        rotary = model_rotary(cfg, max_model_len) if softmax else None
        for i in range(n):
            if i in softmax:
                mixer = LlamaAttention(cfg, softmax.index(i), qkv_bias=False, qk_norm=False, rotary=rotary)
            else:
                mixer = LinearAttention(cfg["hidden_size"], heads, kv_heads, head_dim,
                                        cfg.get("feature_map", "elu1"), bool(cfg.get("normalize", True)),
                                        float(cfg.get("linear_attn_eps", 1e-6)), n_lin)
                n_lin += 1
            layers.append(LlamaDecoderLayer(cfg, i, False, False, None, mixer=mixer))
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        self.tie = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = None if self.tie else ParallelLMHead(cfg["hidden_size"], cfg["vocab_size"])
        for p in self.parameters():
            p.requires_grad_(False)
        self.num_linear_layers = n_lin
        from packserve.kernels.linear_attention import feature_width

        # (Hkv, Dk', Dv) of this rank's heads: the NaLaFormer map doubles the key feature width.
        local_kv = max(1, kv_heads // distributed.tp_size())
        self.linear_state_shape = (local_kv, feature_width(cfg.get("feature_map", "elu1"), head_dim), head_dim)
        self.info = ModelInfo(
            architecture="PackserveLinearAttentionForCausalLM", num_layers=len(softmax), num_kv_heads=local_kv,
            head_dim=head_dim, vocab_size=cfg["vocab_size"],
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)), hidden_size=cfg["hidden_size"],
            eos_token_id=cfg.get("eos_token_id"))

    def forward(self, input_ids, positions, ctx):
        x = self.model.embed_tokens(input_ids)
        residual = None
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, ctx, ctx.output_rows if i == last else None)
        x, _ = self.model.norm(x, residual)
        return x
