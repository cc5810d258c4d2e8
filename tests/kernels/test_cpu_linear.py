"""The C panel GEMM for decode-sized linear layers against an fp64 matmul, and the dispatch in layers.linear."""

import pytest
import torch

from packserve.kernels import cpu_ops as K
from packserve.layers.linear import PACKED_MAX_ROWS, ColumnLinear, RowLinear, linear, pack_for_cpu, prepack_cpu

pytestmark = pytest.mark.skipif(not K.available(), reason="no C compiler here")


def _ref(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


# M covers every row-tile mix (8, 4, 2, 1 and their sums); N covers partial and single panels; K = 1 too.
@pytest.mark.parametrize("M", [1, 2, 3, 7, 8, 13, 32, 65, 256])
@pytest.mark.parametrize("N,Kin", [(1, 5), (31, 17), (33, 64), (640, 384), (50, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_fp64_matmul(M, N, Kin, bias):
    g = torch.Generator().manual_seed(M * 1000 + N)
    w = torch.randn(N, Kin, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    wide = torch.randn(M, Kin + 7, generator=g)
    x = wide[:, 3:3 + Kin]  # strided rows, as a slice of a fused projection's output
    out = K.linear_packed(x, K.pack_linear(w, b))
    assert out.shape == (M, N) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _ref(x, w, b), atol=1e-4 * Kin ** 0.5, rtol=1e-5)


def test_pack_layout_and_padding():
    w = torch.arange(40 * 3, dtype=torch.float32).view(40, 3)
    p = K.pack_linear(w, torch.ones(40))
    assert p.panels.shape == (2, 3, 32) and (p.out_features, p.in_features) == (40, 3)
    assert torch.equal(p.panels[1, :, :8], w[32:].T) and not p.panels[1, :, 8:].any()
    assert p.bias.shape == (64,) and p.bias[:40].eq(1).all() and not p.bias[40:].any()


def test_rejects_bad_input():
    p = K.pack_linear(torch.randn(8, 4))
    with pytest.raises(ValueError):
        K.linear_packed(torch.randn(2, 5), p)
    with pytest.raises(ValueError):
        K.linear_packed(torch.randn(2, 4).double(), p)
    with pytest.raises(ValueError):
        K.pack_linear(torch.randn(8, 4), torch.randn(7))
    with pytest.raises(ValueError):
        K.pack_linear(torch.randn(8, 4).half())
    assert K.linear_packed(torch.randn(0, 4), p).shape == (0, 8)


@pytest.mark.parametrize("rows", [1, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1])
def test_linear_dispatch_either_side_of_the_row_limit(rows):
    """Decode-sized inputs take the packed weight, longer ones F.linear: the same result either way."""
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 48, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 48, generator=g)
    packed = pack_for_cpu(w, b)
    assert isinstance(packed, K.PanelWeight)
    torch.testing.assert_close(linear(x, w, b, packed).double(), _ref(x, w, b), atol=1e-4, rtol=1e-5)


def test_prepack_cpu_packs_every_linear_with_its_bias():
    model = torch.nn.Sequential(ColumnLinear(16, 40, bias=True), RowLinear(40, 16, bias=True))
    for m in model:
        torch.nn.init.normal_(m.weight)
        torch.nn.init.normal_(m.bias)
    assert prepack_cpu(model) == 2
    x = torch.randn(5, 16)
    want = _ref(torch.relu(_ref(x, model[0].weight, model[0].bias)).float(), model[1].weight, model[1].bias)
    got = model[1](torch.relu(model[0](x)))
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
