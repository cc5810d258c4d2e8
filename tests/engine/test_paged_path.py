"""The CPU paged path (packserve.layers.paged_attention_layer) against the naive fp64 loop: one step mixing
decodes, chunked-prefill continuations and prompts behind a prefix hit, at ragged cached/new lengths; the C decode
kernel with the C prefill operator (or per-request SDPA where that operator is not built), and the torch-only path
(gathered decodes); masks built in row slices when large."""

from __future__ import annotations

import pytest
import torch

from packserve.kernels import cpu_ops
from packserve.kernels.paged_attention_triton import paged_attention_ref
from packserve.layers import paged_attention_layer as paged
from tests.support.engine_cases import batch_view, paged_case

CTX = [0, 5, 16, 63, 100, 300, 1, 31, 7]
QLENS = [1, 2, 17, 64, 65, 1, 33, 1, 1]


def _step(ctx, qlens, H, Hkv, D, bs, kernel, seed=0, poison=True):
    lens = [c + n for c, n in zip(ctx, qlens)]
    _, kc, vc, tables, _ = paged_case(lens, H, Hkv, D, bs, seed=seed)
    if not poison:
        kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    q = torch.randn(sum(qlens), H + 2 * Hkv, D, generator=torch.Generator().manual_seed(seed + 1))[:, :H]
    meta = paged.build_paged_meta(batch_view(tables, ctx, qlens, bs), bs, kernel, torch.device("cpu"))
    out = paged.paged_attention(q, kc, vc, meta, D ** -0.5)
    return out, paged_attention_ref(q, kc, vc, tables, ctx, qlens, bs, D ** -0.5)


@pytest.mark.parametrize("H,Hkv,D,bs", [(6, 2, 64, 16), (4, 4, 32, 16), (8, 1, 24, 8), (2, 2, 80, 32)])
def test_mixed_step_with_the_c_decode_kernel(H, Hkv, D, bs):
    if not cpu_ops.available():
        pytest.skip("the CPU kernels are not built here")
    out, ref = _step(CTX, QLENS, H, Hkv, D, bs, "cpu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("qlens", [[3] * len(CTX), [2, 5, 1, 64, 65, 2, 33, 40, 2]])
@pytest.mark.parametrize("prefill_op", [True, False])
def test_multi_token_requests_with_and_without_the_c_prefill_operator(qlens, prefill_op, monkeypatch):
    """Every request with several new tokens (their rows are the whole segment, in order), or mixed with
    decodes; through the C prefill operator, or per-request SDPA beside the C decode kernel."""
    if not cpu_ops.has_varlen():
        pytest.skip("the CPU prefill operator is not built here")
    if not prefill_op:
        monkeypatch.setattr(paged.cpu_ops, "has_varlen", lambda: False)
    out, ref = _step(CTX, qlens, 6, 2, 64, 16, "cpu", seed=3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("qlens", [QLENS, [1] * len(CTX), [3] * len(CTX)])
def test_mixed_step_torch_only(qlens):
    # The gathered decodes read whole blocks (masked after the product): no NaN in their padding here.
    out, ref = _step(CTX, qlens, 6, 2, 32, 16, "torch", poison=False)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_spans_read_only_their_context():
    """Multi-token requests attend over exactly their positions: NaN everywhere else in the cache is harmless."""
    out, ref = _step([0, 40, 3], [70, 20, 5], 4, 2, 16, 16, "torch", poison=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_large_masks_go_in_row_slices(monkeypatch):
    built = []
    real = paged.span_mask
    monkeypatch.setattr(paged, "span_mask", lambda *a: built.append(len(a[1])) or real(*a))
    monkeypatch.setattr(paged, "MASK_MAX_ELEMENTS", 1000)
    out, ref = _step([50, 0], [90, 40], 4, 2, 16, 16, "torch")
    assert max(built) < 90 and len(built) > 2
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
