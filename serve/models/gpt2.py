"""GPT-2 (Pre-LN, learned positions, Conv1D weights), with optional exact conversion
to Pre-RMSNorm or Pre-CRMSNorm at load time (norm_mode; see norm_conversion.py)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from packserve import distributed
from packserve.layers.attention import Attention, ForwardContext, select_rows
from packserve.layers.linear import MergedColumnLinear, RowLinear, whole
from packserve.layers.mlp import PlainMLP
from packserve.layers.norm import CRMSNorm, LayerNorm, PlainRMSNorm
from packserve.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from packserve.models.base import CausalLM, ModelInfo, load_into

# Conv1D stores [in, out]; nn.Linear wants [out, in].
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _norm(kind: str, d: int, eps: float) -> nn.Module:
    if kind == "native":
        return LayerNorm(d, eps)
    if kind == "rmsnorm":
        return PlainRMSNorm(d, eps)
    if kind == "crmsnorm":
        return CRMSNorm(d, eps)
    raise ValueError(f"unknown norm_mode {kind!r}")


class GPT2Block(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int, norm_mode: str, width: int):
        super().__init__()
        d = cfg["n_embd"]
        eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.head_dim = d // cfg["n_head"]
        self.num_heads = cfg["n_head"] // distributed.tp_size()  # tensor parallel: this rank's heads
        self.d = self.num_heads * self.head_dim
        self.ln_1 = _norm(norm_mode, d, eps)
        self.ln_2 = _norm(norm_mode, d, eps)
        # The checkpoint's fused [q; k; v] is split per part (each rank: its heads of q, k and v).
        self.c_attn = MergedColumnLinear(width, {"q": d, "k": d, "v": d}, bias=True)
        self.c_proj = RowLinear(d, width, bias=True)
        scale = self.head_dim ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale, layer_idx)
        self.mlp = PlainMLP(width, cfg.get("n_inner") or 4 * d, cfg.get("activation_function", "gelu_new"),
                            out_features=width)

    def forward(self, x, residual, ctx: ForwardContext, rows=None):
        """`rows`: the block's output keeps only these rows (the model's last block: ForwardContext.output_rows)."""
        if residual is None:
            residual = x
            h = self.ln_1(x)
        else:
            h, residual = self.ln_1(x, residual)
        q, k, v = self.c_attn(h).split(self.d, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        a = self.attn(q.reshape(shape), k.reshape(shape), v.reshape(shape), ctx)
        a = self.c_proj(select_rows(a.reshape(-1, self.d), rows))
        h, residual = self.ln_2(a, select_rows(residual, rows))
        return self.mlp(h), residual


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: dict, max_model_len: int, norm_mode: str = "native"):
        super().__init__()
        d = cfg["n_embd"]
        self.norm_mode = norm_mode
        # CRMSNorm keeps d-1 coordinates of the zero-mean residual stream.
        self.width = d - 1 if norm_mode == "crmsnorm" else d
        self.wte = VocabParallelEmbedding(cfg["vocab_size"], self.width)
        self.wpe = nn.Embedding(cfg["n_positions"], self.width)
        self.h = nn.ModuleList(GPT2Block(cfg, i, norm_mode, self.width) for i in range(cfg["n_layer"]))
        self.ln_f = _norm(norm_mode, d, cfg.get("layer_norm_epsilon", 1e-5))
        # After conversion the LM head carries the folded ln_f gain and bias: untied, with a bias.
        self.lm_head = None if norm_mode == "native" else ParallelLMHead(self.width, cfg["vocab_size"], bias=True)
        for p in self.parameters():
            p.requires_grad_(False)
        self.info = ModelInfo(
            architecture="GPT2LMHeadModel", num_layers=cfg["n_layer"], num_kv_heads=self.h[0].num_heads,
            head_dim=d // cfg["n_head"], vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["n_positions"],
            hidden_size=d, eos_token_id=cfg.get("eos_token_id"))

    def forward(self, input_ids, positions, ctx):
        x = self.wte(input_ids) + self.wpe(positions)
        residual = None
        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            x, residual = block(x, residual, ctx, ctx.output_rows if i == last else None)
        x, _ = self.ln_f(x, residual)
        return x

    def tied_head_weight(self):
        return self.wte.weight if self.lm_head is None else None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        weights = ((name, whole(t)) for name, t in weights)  # transposed and converted whole, then sliced
        if self.norm_mode != "native":
            from packserve.models.norm_conversion import convert_gpt2

            converted = convert_gpt2(dict(weights), self.norm_mode)
            if converted.residual_width != self.width:
                raise ValueError(f"converted residual width {converted.residual_width} != model width {self.width}")
            weights = converted

        def rename(name: str) -> str | None:
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                return None  # causal-mask buffers in old checkpoints
            name = name.removeprefix("transformer.")
            if name == "lm_head.weight" and self.lm_head is None:
                return None  # tied to wte
            return name.replace(".attn.c_attn.", ".c_attn.").replace(".attn.c_proj.", ".c_proj.")

        def transposed():
            for name, t in weights:
                yield name, (t.t() if name.endswith(CONV1D) else t)

        load_into(self, transposed(), rename, {})
