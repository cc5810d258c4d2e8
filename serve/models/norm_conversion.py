r"""Exact conversion of a Pre-LN GPT-2 into Pre-RMSNorm or Pre-CRMSNorm form
(Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient
Pre-LN Transformers").

A pure function over a Hugging Face GPT-2 state dict (GPT2LMHeadModel names, with or
without the `transformer.` prefix; Conv1D weights stored [in, out]; `lm_head.weight`
[vocab, d] tied to `wte` when absent). Notation: d = n_embd, P = I - 11^T/d (centering),
a LayerNorm with gain g and bias b, a reader Conv1D with weight W [d, out] and bias c.

1. Fold the LayerNorm affine into its readers (c_attn <- ln_1, c_fc <- ln_2, lm_head <- ln_f):
       LN(x) W + c = (g * n(x)) W + b W + c = n(x) (diag(g) W) + (b W + c)
   so W' = g[:, None] * W, c' = c + b @ W, where n(x) = P x / sqrt(|P x|^2 / d + eps).
   The LM head gets an explicit weight E' = E * g[None, :] and bias E @ b, so it is untied.
2. Re-center every writer into the residual stream (wte, wpe rows; attn.c_proj and
   mlp.c_proj output columns and biases): M' = M P, i.e. subtract the mean over the
   residual axis. Every write is then zero-mean, so the residual is x' = P x, where x is
   the original residual (P is linear, the residual is a sum of writes). The readers only
   ever see n(x) = n(P x), and for zero-mean x', n(x') = x' / sqrt(mean(x'^2) + eps): a
   LayerNorm without affine *is* an RMSNorm without affine. Mode "rmsnorm" stops here.
3. CRMSNorm ("crmsnorm"): a zero-mean x' is determined by its first d-1 coordinates y,
   since x'_d = -sum(y). Writers drop their last output column (M'' = M'[..., :d-1]); the
   norm becomes CRMSNorm, y * rsqrt((sum(y^2) + sum(y)^2) / d + eps), whose output is the
   first d-1 coordinates of the RMSNorm output r (with r_d = -sum of them). Readers absorb
   the dropped coordinate: r W = sum_{i<d} r_i W[i] + r_d W[d] = sum_{i<d} r_i (W[i] - W[d]),
   so W''[i, :] = W'[i, :] - W'[d-1, :] for i < d-1 (for the [vocab, d] LM head,
   E''[:, i] = E'[:, i] - E'[:, d-1]); biases are unchanged.

All arithmetic happens in fp64; results are cast to the requested dtype (default: the
input's). The equivalence is exact in real arithmetic; in fp64 it holds to ~1e-13.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

NORM_MODES = ("rmsnorm", "crmsnorm")
# Non-weight buffers some GPT-2 checkpoints carry (causal-mask tables): dropped.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")


@dataclass(frozen=True)
class ConvertedGPT2:
    """The converted tensors (HF GPT-2 names, Conv1D layouts, no LayerNorm parameters,
    `lm_head.weight` + `lm_head.bias`) and the structure they describe. Iterating yields
    (name, tensor) pairs, like a checkpoint reader, so it feeds a model's load_weights."""

    tensors: dict[str, torch.Tensor] = field(repr=False)
    mode: str  # "rmsnorm" | "crmsnorm"
    hidden_size: int  # d: the width the norm statistics are taken over
    residual_width: int  # d (rmsnorm) or d - 1 (crmsnorm): what is stored and added
    norm: str  # the norm the model must run, without affine: "rmsnorm" | "crmsnorm"
    num_layers: int

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())

    def items(self):
        return self.tensors.items()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(self.tensors)


def _center(t: torch.Tensor) -> torch.Tensor:
    """Project the last (residual) axis onto zero mean: t P."""
    return t - t.mean(-1, keepdim=True)


def _fold_conv1d(w: torch.Tensor, c: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LN(g, b) followed by Conv1D (W [d, out], c) -> (diag(g) W, c + b W)."""
    return g[:, None] * w, c + b @ w


def _layer_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}h\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def convert_gpt2(state_dict: Mapping[str, torch.Tensor], mode: str,
                 dtype: torch.dtype | None = None) -> ConvertedGPT2:
    """Convert a Pre-LN GPT-2 state dict to Pre-RMSNorm ("rmsnorm") or Pre-CRMSNorm ("crmsnorm").

    The input is not modified. See the module docstring for the math."""
    if mode not in NORM_MODES:
        raise ValueError(f"norm conversion mode must be one of {NORM_MODES}, got {mode!r}")
    prefix = "transformer." if any(k.startswith("transformer.") for k in state_dict) else ""
    wte_key = f"{prefix}wte.weight"
    if wte_key not in state_dict:
        raise KeyError(f"not a GPT-2 state dict: no {wte_key!r}")
    layers = _layer_indices(state_dict, prefix)
    if layers != list(range(len(layers))):
        raise KeyError(f"GPT-2 layers are not numbered 0..n-1: {layers}")
    expected = {wte_key, f"{prefix}wpe.weight", f"{prefix}ln_f.weight", f"{prefix}ln_f.bias", "lm_head.weight"}
    expected |= {f"{prefix}h.{i}.{k}" for i in layers for k in _LAYER_KEYS}
    present = {k for k in state_dict if not k.endswith(_BUFFERS)}
    if unknown := present - expected:
        raise KeyError(f"unexpected tensors for a GPT-2 norm conversion: {sorted(unknown)[:8]}")
    if missing := expected - present - {"lm_head.weight"}:
        raise KeyError(f"GPT-2 state dict is missing: {sorted(missing)[:8]}")

    out_dtype = dtype or state_dict[wte_key].dtype

    def get(name: str) -> torch.Tensor:
        return state_dict[name].detach().to(device="cpu", dtype=torch.float64)

    d = state_dict[wte_key].shape[1]
    crms = mode == "crmsnorm"
    new: dict[str, torch.Tensor] = {}

    def writer(name: str, t: torch.Tensor) -> None:
        t = _center(t)
        new[name] = t[..., : d - 1] if crms else t

    def reader(name: str, t: torch.Tensor, in_dim: int) -> None:
        if crms:  # absorb the dropped coordinate r_d = -sum(r_i): W[i] - W[d-1]
            t = t.narrow(in_dim, 0, d - 1) - t.narrow(in_dim, d - 1, 1)
        new[name] = t

    writer(wte_key, get(wte_key))
    writer(f"{prefix}wpe.weight", get(f"{prefix}wpe.weight"))
    for i in layers:
        p = f"{prefix}h.{i}."
        for ln, lin in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")):
            w, c = _fold_conv1d(get(p + lin + ".weight"), get(p + lin + ".bias"), get(p + ln + ".weight"),
                                get(p + ln + ".bias"))
            reader(p + lin + ".weight", w, in_dim=0)  # Conv1D: [in, out]
            new[p + lin + ".bias"] = c
        for lin in ("attn.c_proj", "mlp.c_proj"):
            writer(p + lin + ".weight", get(p + lin + ".weight"))  # Conv1D [in, d]: the residual is the last axis
            writer(p + lin + ".bias", get(p + lin + ".bias"))
    head = get("lm_head.weight") if "lm_head.weight" in state_dict else get(wte_key)  # tied
    g, b = get(f"{prefix}ln_f.weight"), get(f"{prefix}ln_f.bias")
    reader("lm_head.weight", head * g[None, :], in_dim=1)  # nn.Linear: [vocab, in]
    new["lm_head.bias"] = head @ b

    tensors = {k: v.to(out_dtype).contiguous() for k, v in new.items()}
    return ConvertedGPT2(tensors, mode, hidden_size=d, residual_width=d - 1 if crms else d, norm=mode,
                         num_layers=len(layers))

