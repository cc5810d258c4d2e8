"""Pre-LN GPT-2 -> Pre-RMSNorm / Pre-CRMSNorm conversion is exact.

An independent pure-torch GPT-2 forward (below) runs the converted weights; logits are
compared with transformers' GPT2LMHeadModel on the same seeded weights, whose LayerNorm
gains/biases and embedding means are randomized (transformers initializes them to 1/0).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from packserve.checkpoints import build_tokenizer, random_hf_model, save_checkpoint, tiny_config
from packserve.models.norm_conversion import NORM_MODES, convert_gpt2

VOCAB = 512
EPS = 1e-5
LENGTHS = (1, 5, 17, 64)


def make_hf(dtype: torch.dtype = torch.float64, seed: int = 0, n_layer: int = 3):
    cfg = tiny_config("gpt2", VOCAB, n_layer=n_layer, layer_norm_epsilon=EPS)
    model = random_hf_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        # A per-token / per-position offset common to all features: the residual gets a large mean.
        tr = model.transformer
        tr.wte.weight.add_(torch.randn(tr.wte.weight.shape[0], 1, generator=g))
        tr.wpe.weight.add_(0.5 * torch.randn(tr.wpe.weight.shape[0], 1, generator=g))
    return model.to(dtype).eval()


def prompts(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


# ---- an independent GPT-2 forward over a state dict ----------------------------------------

def gpt2_forward(sd, cfg, ids: torch.Tensor, norm: str) -> torch.Tensor:
    """norm: "layernorm" (native weights), "rmsnorm" / "crmsnorm" (converted weights, no affine)."""
    pre = "transformer." if "transformer.wte.weight" in sd else ""
    d, heads = cfg.n_embd, cfg.n_head
    hd = d // heads

    def normalize(x: torch.Tensor, ln: str) -> torch.Tensor:
        if norm == "layernorm":
            return F.layer_norm(x, (d,), sd[f"{pre}{ln}.weight"], sd[f"{pre}{ln}.bias"], EPS)
        if norm == "rmsnorm":
            assert x.shape[-1] == d
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
        assert x.shape[-1] == d - 1
        ms = (x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)) / d
        return x * torch.rsqrt(ms + EPS)

    def conv1d(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ sd[f"{name}.weight"] + sd[f"{name}.bias"]

    T = ids.shape[0]
    x = sd[f"{pre}wte.weight"][ids] + sd[f"{pre}wpe.weight"][torch.arange(T)]
    for i in range(cfg.n_layer):
        p = f"{pre}h.{i}."
        q, k, v = conv1d(normalize(x, f"h.{i}.ln_1"), p + "attn.c_attn").split(d, dim=-1)
        q, k, v = (t.view(T, heads, hd).transpose(0, 1) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, d)
        x = x + conv1d(a, p + "attn.c_proj")
        h = F.gelu(conv1d(normalize(x, f"h.{i}.ln_2"), p + "mlp.c_fc"), approximate="tanh")
        x = x + conv1d(h, p + "mlp.c_proj")
    h = normalize(x, "ln_f")
    if norm == "layernorm":
        return h @ sd.get("lm_head.weight", sd[f"{pre}wte.weight"]).T
    return h @ sd["lm_head.weight"].T + sd["lm_head.bias"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def hf64():
    return make_hf(torch.float64)


def test_independent_forward_matches_transformers(hf64):
    """The test's own forward is trustworthy: native weights, LayerNorm, == transformers."""
    sd = hf64.state_dict()
    for ids in prompts():
        assert rel_err(gpt2_forward(sd, hf64.config, ids, "layernorm"), hf_logits(hf64, ids)) <= 1e-12


def test_residual_mean_is_far_from_zero(hf64):
    """Otherwise re-centering would be a no-op and the test could not fail."""
    x = hf64.transformer.wte.weight
    assert x.mean(-1).abs().mean() > 0.3


@pytest.mark.parametrize("mode", NORM_MODES)
def test_fp64_exact(hf64, mode):
    conv = convert_gpt2(hf64.state_dict(), mode)
    assert all(t.dtype == torch.float64 for _, t in conv)
    for ids in prompts():
        assert rel_err(gpt2_forward(conv.tensors, hf64.config, ids, mode), hf_logits(hf64, ids)) <= 1e-10


@pytest.mark.parametrize("mode", NORM_MODES)
def test_fp32(mode):
    hf32 = make_hf(torch.float32)
    conv = convert_gpt2(hf32.state_dict(), mode)
    assert all(t.dtype == torch.float32 for _, t in conv)
    for ids in prompts(seed=1):
        assert rel_err(gpt2_forward(conv.tensors, hf32.config, ids, mode), hf_logits(hf32, ids)) <= 1e-5


def test_conversion_is_needed(hf64):
    """Dropping the native LayerNorms for RMSNorms without converting must give different logits."""
    sd = dict(hf64.state_dict())
    sd["lm_head.bias"] = torch.zeros(VOCAB, dtype=torch.float64)
    ids = prompts()[2]
    assert rel_err(gpt2_forward(sd, hf64.config, ids, "rmsnorm"), hf_logits(hf64, ids)) > 1e-2


def test_structure(hf64):
    d = hf64.config.n_embd
    src = {k: v.clone() for k, v in hf64.state_dict().items()}
    for mode, width in (("rmsnorm", d), ("crmsnorm", d - 1)):
        conv = convert_gpt2(src, mode, dtype=torch.float32)
        assert (conv.mode, conv.norm, conv.hidden_size, conv.residual_width, conv.num_layers) == \
            (mode, mode, d, width, hf64.config.n_layer)
        t = conv.tensors
        assert not any(".ln_" in k for k in t), "LayerNorm parameters must be folded away"
        assert t["transformer.wte.weight"].shape == (VOCAB, width)
        assert t["transformer.wpe.weight"].shape[1] == width
        assert t["lm_head.weight"].shape == (VOCAB, width) and t["lm_head.bias"].shape == (VOCAB,)
        for i in range(hf64.config.n_layer):
            p = f"transformer.h.{i}."
            assert t[p + "attn.c_attn.weight"].shape == (width, 3 * d)
            assert t[p + "attn.c_proj.weight"].shape == (d, width) and t[p + "attn.c_proj.bias"].shape == (width,)
            assert t[p + "mlp.c_fc.weight"].shape == (width, 4 * d)
            assert t[p + "mlp.c_proj.weight"].shape == (4 * d, width) and t[p + "mlp.c_proj.bias"].shape == (width,)
        if mode == "rmsnorm":  # writers are zero-mean over the residual axis
            for k in ("transformer.wte.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.attn.c_proj.bias"):
                assert t[k].double().mean(-1).abs().max() < 1e-6
    # Pure: the input is untouched.
    for k, v in hf64.state_dict().items():
        assert torch.equal(src[k], v)


def test_unprefixed_names_and_old_buffers(hf64):
    """GPT2Model-style names (no `transformer.`), no lm_head (tied), old causal-mask buffers."""
    sd = {k.removeprefix("transformer."): v for k, v in hf64.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    conv = convert_gpt2(sd, "crmsnorm")
    assert "h.0.attn.bias" not in conv.tensors and "wte.weight" in conv.tensors
    ids = prompts()[3]
    assert rel_err(gpt2_forward(conv.tensors, hf64.config, ids, "crmsnorm"), hf_logits(hf64, ids)) <= 1e-10


def test_errors(hf64):
    sd = hf64.state_dict()
    with pytest.raises(ValueError, match="mode"):
        convert_gpt2(sd, "native")
    with pytest.raises(KeyError, match="missing"):
        convert_gpt2({k: v for k, v in sd.items() if "ln_2.bias" not in k}, "rmsnorm")
    with pytest.raises(KeyError, match="unexpected"):
        convert_gpt2({**sd, "transformer.h.0.extra.weight": torch.zeros(1)}, "rmsnorm")
    with pytest.raises(KeyError, match="GPT-2"):
        convert_gpt2({"model.embed_tokens.weight": torch.zeros(4, 4)}, "rmsnorm")


# ---- through the engine -------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    tok = build_tokenizer(VOCAB)
    model = make_hf(torch.float32, seed=3, n_layer=2)
    return str(save_checkpoint(model, tok, tmp_path_factory.mktemp("gpt2-ln")))


def test_engine_greedy_identical_native_vs_converted(gpt2_checkpoint):
    from packserve import LLM, SamplingParams

    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(5, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 40, 3, 77, 20)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    native = LLM(gpt2_checkpoint, num_kv_blocks=128, dtype="float32")
    want = [o.outputs[0].token_ids for o in native.generate(ps, params)]
    ref_logits = native.engine.prefill_logits(ps)
    for mode in NORM_MODES:
        llm = LLM(gpt2_checkpoint, num_kv_blocks=128, dtype="float32", norm_mode=mode)
        assert [o.outputs[0].token_ids for o in llm.generate(ps, params)] == want, mode
        logits = llm.engine.prefill_logits(ps)
        for i in range(len(ps)):
            assert rel_err(logits[i], ref_logits[i]) <= 1e-5, (mode, i)
        if mode == "crmsnorm":
            assert llm.engine.model.wte.weight.shape[1] == native.engine.model.wte.weight.shape[1] - 1
