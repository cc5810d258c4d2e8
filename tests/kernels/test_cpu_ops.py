"""The CPU paged decode kernel against a naive fp64 loop and against the torch gather + SDPA path."""

import pytest
import torch

from packserve.kernels import cpu_ops as K
from packserve.kernels.paged_attention_triton import paged_decode_ref
from packserve.layers.paged_attention_layer import build_paged_meta, paged_attention
from tests.support.engine_cases import batch_view, gather_sdpa_decode, paged_case as setup

pytestmark = pytest.mark.usefixtures("each_isa")  # tests/kernels/conftest.py: every ISA build

LENS = [1, 2, 15, 16, 17, 63, 64, 65, 300, 3]


# The kernel's paths: specialized vector code (D in 64/128, G in 1/2/3/4/8), the generic vector code (D a multiple
# of 16 up to 256, G up to 8: 80, 48) and the scalar loops (D = 24; G = 12).
@pytest.mark.parametrize("H,Hkv,D,bs", [(6, 2, 64, 16), (4, 4, 32, 16), (8, 1, 80, 8), (2, 2, 64, 1),
                                        (8, 2, 128, 16), (6, 2, 48, 4), (4, 2, 24, 4), (12, 1, 64, 16)])
def test_matches_naive_loop(H, Hkv, D, bs):
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs)
    assert not q.is_contiguous()
    out = K.paged_decode_attention(q, kc, vc, table, torch.tensor(LENS), bs, D ** -0.5)
    ref = paged_decode_ref(q, kc, vc, tables, LENS, bs, D ** -0.5)
    assert out.shape == (len(LENS), H, D) and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("H,Hkv,D", [(6, 2, 64), (4, 2, 24)])
def test_online_softmax_rescales_across_tiles(H, Hkv, D):
    """Large scores that vary across slots: the running max changes from tile to tile, so the accumulated sums are
    rescaled many times. With scores this large fp32 itself loses digits, so the bound is the error of torch's
    fp32 gather + SDPA path against the fp64 loop."""
    bs = 16
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs, seed=2)
    kc = kc * (1 + torch.arange(kc.shape[0]) % 97 / 8.0).view(-1, 1, 1)
    q = q * 4
    lens = torch.tensor(LENS)
    out = K.paged_decode_attention(q, kc, vc, table, lens, bs, D ** -0.5)
    ref = paged_decode_ref(q, kc, vc, tables, LENS, bs, D ** -0.5)
    torch_fp32 = gather_sdpa_decode(q, kc.nan_to_num(0.0), vc.nan_to_num(0.0), table, lens, bs, D ** -0.5)
    assert torch.isfinite(out).all()
    bound = (torch_fp32.double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 4 * bound + 1e-6  # a missed rescale errs by O(1)


def test_matches_gather_sdpa_path():
    """The same step through packserve's torch paged path (gathered blocks, additive mask) and its C one."""
    H, Hkv, D, bs = 6, 2, 64, 16
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs, seed=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # the gather path reads whole blocks (masked afterwards)
    lens = torch.tensor(LENS)
    want = gather_sdpa_decode(q, kc, vc, table, lens, bs, D ** -0.5)
    view = batch_view(tables, [n - 1 for n in LENS], [1] * len(LENS), bs)
    meta = build_paged_meta(view, bs, "cpu", torch.device("cpu"))
    got = paged_attention(q, kc, vc, meta, D ** -0.5)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_rejects_bad_input():
    q, kc, vc, _, table = setup([5, 9], 4, 2, 16, 4)
    lens = torch.tensor([5, 9])
    # The operator's checks guard memory: a wrong call raises instead of reading out of bounds.
    with pytest.raises(RuntimeError, match="fp32"):
        K.paged_decode_attention(q.half(), kc, vc, table, lens, 4, 0.25)
    with pytest.raises(RuntimeError, match="outside its block table"):
        K.paged_decode_attention(q, kc, vc, table, torch.tensor([0, 9]), 4, 0.25)
    with pytest.raises(RuntimeError, match="outside its block table"):
        K.paged_decode_attention(q, kc, vc, table, torch.tensor([5, 13]), 4, 0.25)
    with pytest.raises(RuntimeError, match="block id is outside the cache"):
        K.paged_decode_attention(q, kc, vc, table + kc.shape[0], lens, 4, 0.25)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        K.paged_decode_attention(q[:, :3], kc, vc, table, lens, 4, 0.25)
    assert K.paged_decode_attention(q[:0], kc, vc, table[:0], lens[:0], 4, 0.25).shape == (0, 4, 16)


ROWS = [1, 2, 63, 64, 65, 300]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", [1, 384, 769])
def test_rms_norm_matches_reference(rows, cols):
    from packserve.kernels.rmsnorm import fused_add_rms_norm_ref, rms_norm_ref

    g = torch.Generator().manual_seed(rows * 1000 + cols)
    base = torch.randn(rows, cols + 5, generator=g)
    x = base[:, 2:cols + 2]  # strided rows
    r = torch.randn(rows, cols, generator=g)
    w = torch.randn(cols, generator=g)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **tol)
    torch.testing.assert_close(K.rms_norm(x, None, 1e-6), rms_norm_ref(x, None, 1e-6), **tol)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-6, offset=1.0), rms_norm_ref(x, w, 1e-6, offset=1.0), **tol)
    before = base.clone()
    out, res = K.rms_norm(x, w, 1e-6, residual=r)
    want_out, want_res = fused_add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(out, want_out, **tol)
    assert torch.equal(res, want_res)
    assert torch.equal(base, before)  # inputs untouched


def test_rms_norm_dispatch_uses_the_kernel_for_3d_inputs():
    from packserve.kernels.rmsnorm import rms_norm, rms_norm_ref

    x = torch.randn(7, 3, 64)  # per-head norms (Qwen3 q/k norm) arrive as [T, heads, D]
    w = torch.randn(64)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 65, 300])
@pytest.mark.parametrize("D,partial", [(64, 1.0), (80, 0.5)])
def test_rotary_in_place_matches_torch(T, D, partial):
    from packserve.layers.rotary import RotaryEmbedding

    rot = RotaryEmbedding(D, 512, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial})
    g = torch.Generator().manual_seed(T + D)
    H, Hkv = 6, 2
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g)
    positions = torch.randint(0, 512, (T,), generator=g)
    q = qkv[:, :H * D].reshape(T, H, D)
    k = qkv[:, H * D:(H + Hkv) * D].reshape(T, Hkv, D)
    want_q, want_k = rot(positions, q, k)
    v_before = qkv[:, (H + Hkv) * D:].clone()
    K.rotary_(qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), positions, rot.cos, rot.sin)
    torch.testing.assert_close(qkv[:, :H * D].view(T, H, D), want_q, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D), want_k, atol=1e-6, rtol=1e-5)
    assert torch.equal(qkv[:, (H + Hkv) * D:], v_before)  # v untouched
    with pytest.raises(RuntimeError, match="beyond"):
        K.rotary_(qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), positions + 512, rot.cos, rot.sin)
