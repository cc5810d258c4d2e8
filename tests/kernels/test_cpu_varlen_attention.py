"""The CPU packed-prefill attention operator (kernels/csrc/varlen_attention.h) against an fp64 per-prompt causal
reference, on ragged prompt lengths around its 32-token query blocks and 256-key chunks, strided q/k/v (column slices of a fused QKV
output), GQA and MHA, large scores, and prompts poisoned with NaN next to clean ones; plus its dispatch in the
varlen backend and the fake implementations of every CPU operator (torch.library.opcheck)."""

import pytest
import torch

from packserve.kernels import cpu_lib
from packserve.kernels import cpu_ops as K
from packserve.layers.attention import PackedMeta, VarlenBackend

pytestmark = pytest.mark.usefixtures("each_isa")  # tests/kernels/conftest.py: every ISA build

LENS = [1, 2, 31, 32, 33, 63, 64, 65, 300, 3, 97]


def _fused(lens, H, Hkv, D, seed=0, q_scale=1.0):
    """q, k, v as the column slices of one fused QKV output (token stride (H + 2 Hkv) D), and int64 offsets."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g)
    q = qkv[:, :H * D].view(T, H, D) * q_scale if q_scale != 1.0 else qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    return q, k, v, cu


def _reference(q, k, v, lens, scale):
    """Per prompt, fp64: softmax(scale * q k^T + causal mask) v, each query head on its KV head (h // G)."""
    G = q.shape[1] // k.shape[1]
    out, s = [], 0
    for n in lens:
        qs, ks, vs = (t[s:s + n].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(G, dim=1), vs.repeat_interleave(G, dim=1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs))
        s += n
    return torch.cat(out)


@pytest.mark.parametrize("H,Hkv,D", [(6, 2, 64), (4, 4, 32), (8, 1, 80), (12, 4, 128), (3, 3, 24)])
def test_matches_fp64_reference(H, Hkv, D):
    q, k, v, cu = _fused(LENS, H, Hkv, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = K.varlen_attention(q, k, v, cu, D ** -0.5)
    assert out.shape == (sum(LENS), H, D) and out.is_contiguous() and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _reference(q, k, v, LENS, D ** -0.5), atol=3e-6, rtol=3e-5)


@pytest.mark.parametrize("lens", [[1], [32], [33], [255], [256], [257], [513], [700], [5] * 40, [256, 1, 257]])
def test_single_and_many_prompts(lens):
    q, k, v, cu = _fused(lens, 6, 2, 64, seed=len(lens))
    out = K.varlen_attention(q, k, v, cu, 0.125)
    torch.testing.assert_close(out.double(), _reference(q, k, v, lens, 0.125), atol=3e-6, rtol=3e-5)


def test_online_softmax_rescales_across_tiles():
    """Large scores that grow along the prompt: the running max changes from chunk to chunk, so the accumulator
    is rescaled many times (900 tokens: four 256-key chunks); a missed rescale errs by O(1). Scores this large
    are only as exact as fp32 makes them, so the yardstick is torch's own fp32 attention on the same inputs: no
    more than twice its error against the fp64 reference."""
    lens = [900, 70]
    q, k, v, cu = _fused(lens, 6, 2, 64, seed=3, q_scale=6.0)
    k = k * (1 + torch.arange(k.shape[0]) / 50.0).view(-1, 1, 1)
    out = K.varlen_attention(q, k, v, cu, 0.125)
    ref = _reference(q, k, v, lens, 0.125)
    assert torch.isfinite(out).all()
    fp32 = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=0.125, enable_gqa=True).transpose(0, 1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch_err = (fp32.double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-6


def test_prompts_do_not_see_each_other():
    """NaN in one prompt's q/k/v: every other prompt's output is unchanged (block-diagonal), bit for bit."""
    q, k, v, cu = _fused(LENS, 6, 2, 64, seed=4)
    clean = K.varlen_attention(q, k, v, cu, 0.125)
    poisoned = 8  # the 300-token prompt
    a, b = int(cu[poisoned]), int(cu[poisoned + 1])
    for t in (q, k, v):
        t[a:b] = float("nan")
    out = K.varlen_attention(q, k, v, cu, 0.125)
    assert torch.isnan(out[a:b]).all()
    assert torch.equal(torch.cat([out[:a], out[b:]]), torch.cat([clean[:a], clean[b:]]))


def test_rejects_bad_input():
    q, k, v, cu = _fused([5, 9], 4, 2, 16)
    with pytest.raises(RuntimeError, match="fp32"):
        K.varlen_attention(q.double(), k, v, cu, 0.25)
    with pytest.raises(RuntimeError, match="from 0 to the token count"):
        K.varlen_attention(q, k, v, torch.tensor([0, 5, 13]), 0.25)
    with pytest.raises(RuntimeError, match="at least one token"):
        K.varlen_attention(q, k, v, torch.tensor([0, 5, 5, 14]), 0.25)
    with pytest.raises(RuntimeError, match="int64"):
        K.varlen_attention(q, k, v, cu.int(), 0.25)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        K.varlen_attention(q[:, :3], k, v, cu, 0.25)
    with pytest.raises(RuntimeError, match="heads and dims contiguous"):
        K.varlen_attention(q.transpose(1, 2), k, v, cu, 0.25)


def test_varlen_backend_uses_the_operator_and_matches_per_prompt_sdpa():
    """The CPU varlen backend (the default prefill path) through the operator equals its per-prompt SDPA path."""
    q, k, v, cu = _fused(LENS, 6, 2, 64, seed=5)
    meta = PackedMeta(num_tokens=sum(LENS), cu_seqlens=cu.int(), max_seqlen=max(LENS), seq_lens=LENS)
    backend = VarlenBackend(torch.device("cpu"))
    backend.prepare(meta, torch.device("cpu"))
    got = backend.packed(q, k, v, meta, 0.125)
    want = VarlenBackend._per_sequence(q, k, v, meta, 0.125)
    torch.testing.assert_close(got, want, atol=3e-6, rtol=3e-5)


def test_fake_implementations_match_the_operators():
    """torch.library.opcheck: each operator's schema holds and its fake implementation gives the real output's
    shape, dtype and strides (what torch.compile traces with)."""
    ops = cpu_lib.ops()
    q, k, v, cu = _fused([3, 40], 4, 2, 16)
    x, r, w = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)
    kc, vc = torch.randn(16, 2, 16), torch.randn(16, 2, 16)
    panels = K.pack_linear(torch.randn(40, 48), torch.randn(40))
    cos, sin = torch.randn(64, 8), torch.randn(64, 8)
    cases = {
        "rms_norm": (x, w, 1e-6, 0.0),
        "add_rms_norm": (x, r, None, 1e-6, 1.0),
        "rotary_": (torch.randn(5, 3, 16), torch.arange(5), cos, sin),
        "silu_mul": (torch.randn(5, 48),),
        "argmax_rows": (x,),
        "linear_panels": (x, panels.panels, panels.bias, 40),
        "paged_decode_attention": (q[:2], kc, vc, torch.tensor([[0, 1], [2, 3]]), torch.tensor([3, 7]), 4, 0.25),
        "varlen_attention": (q, k, v, cu, 0.25),
        "apply_token_bitmask_": (torch.randn(3, 40), torch.full((3, 2), -1, dtype=torch.int32), torch.tensor([0, 2])),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(ops, name).default, args, test_utils=("test_schema", "test_faketensor"))
