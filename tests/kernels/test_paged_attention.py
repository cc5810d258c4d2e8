"""The Triton paged decode kernel (GPU decode path) against the naive fp64 loop and the torch gather + SDPA path:
ragged context lengths, every block size, GQA / MHA / MQA, head dims that are not powers of two, splits (with
empty ones), strided q rows, NaN-poisoned cache slots outside the requests' contexts.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported; when
an earlier test module imported triton without it, `test_interpreter_checks_in_subprocess` runs this file in a
fresh interpreter). fp32 and fp16 here; bf16 only on a GPU (the interpreter's bf16 is wrong).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from tests.support.engine_cases import gather_sdpa_decode, paged_case  # noqa: E402  (after the flag)
from tests.support.interpreter import (interpreted_module, run_tests_in_interpreter,  # noqa: E402
                                       triton_interpreted)

IN_PROCESS = ON_GPU or triton_interpreted()
pa = interpreted_module("packserve.kernels.paged_attention_triton", "_paged_kernel")
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported without TRITON_INTERPRET; "
                                                       "test_interpreter_checks_in_subprocess runs these")


@pytest.mark.skipif(IN_PROCESS, reason="the checks run in this process")
def test_interpreter_checks_in_subprocess():
    run_tests_in_interpreter(__file__)


DEV = torch.device("cuda" if ON_GPU else "cpu")
LENS = [1, 2, 15, 16, 17, 63, 64, 65, 300, 3]


def setup(lens, H, Hkv, D, bs, dtype=torch.float32, seed=0):
    """tests/support/engine_cases.paged_case on DEV with an int32 block table (the kernel takes either width)."""
    return paged_case(lens, H, Hkv, D, bs, seed=seed, dtype=dtype, device=DEV, table_dtype=torch.int32)


def run(q, kc, vc, table, lens, bs, splits):
    return pa.paged_decode_attention_triton(q, kc, vc, table, torch.tensor(lens, device=DEV), bs,
                                            q.shape[-1] ** -0.5, max(lens), splits=splits)


@in_process
@pytest.mark.parametrize("H,Hkv,D,bs", [(6, 2, 64, 16), (4, 4, 32, 16), (8, 1, 80, 8), (2, 2, 64, 1),
                                        (12, 1, 24, 32), (4, 2, 16, 64), (2, 1, 160, 16)])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_naive_loop_fp32(H, Hkv, D, bs, splits):
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs)
    assert not q.is_contiguous()
    out = run(q, kc, vc, table, LENS, bs, splits)
    ref = pa.paged_decode_ref(q, kc, vc, tables, LENS, bs, D ** -0.5)
    assert out.shape == (len(LENS), H, D) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)


@in_process
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not ON_GPU, reason="bf16 is wrong in the Triton interpreter; checked on a GPU"))])
def test_half_precision(splits, dtype):
    H, Hkv, D, bs = 8, 2, 64, 16
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs, dtype=dtype, seed=3)
    out = run(q, kc, vc, table, LENS, bs, splits)
    ref = pa.paged_decode_ref(q, kc, vc, tables, LENS, bs, D ** -0.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 5e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)


@in_process
def test_matches_torch_gather_path_and_splits_agree():
    """The engine's torch paged path (gather + additive mask + SDPA) on the same step; 1 and 5 splits agree (the
    5-split run has splits past the end of every short request: empty splits carry no weight)."""
    H, Hkv, D, bs = 6, 2, 64, 16
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs, seed=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # the gather path reads whole blocks (masked afterwards)
    want = gather_sdpa_decode(q, kc, vc, table, torch.tensor(LENS, device=DEV), bs, D ** -0.5)
    one, five = run(q, kc, vc, table, LENS, bs, 1), run(q, kc, vc, table, LENS, bs, 5)
    torch.testing.assert_close(one, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(five, one, atol=2e-6, rtol=2e-6)


@in_process
def test_rejects_bad_input():
    q, kc, vc, tables, table = setup([5, 9], 4, 2, 16, 4)
    lens = torch.tensor([5, 9], device=DEV)
    with pytest.raises(ValueError):
        pa.paged_decode_attention_triton(q[:, :3], kc, vc, table, lens, 4, 0.25, 9)
    with pytest.raises(ValueError):
        pa.paged_decode_attention_triton(q, kc, vc, table, lens, 3, 0.25, 9)
    with pytest.raises(ValueError):
        pa.paged_decode_attention_triton(q, kc, vc, table[:1], lens, 4, 0.25, 9)
    assert pa.paged_decode_attention_triton(q[:0], kc, vc, table[:0], lens[:0], 4, 0.25, 1).shape == (0, 4, 16)


def test_num_splits_heuristic():
    assert pa.num_splits(4, 8, 100_000, torch.device("cpu")) == 1  # no splits off the GPU
    if ON_GPU:
        sms = torch.cuda.get_device_properties(DEV).multi_processor_count
        assert pa.num_splits(1, 8, 32 * 1024, DEV) > 1  # one long request: split to fill the SMs
        assert pa.num_splits(4 * sms, 8, 32 * 1024, DEV) == 1  # plenty of programs already
        assert pa.num_splits(1, 8, 100, DEV) == 1  # too short to split


# -- several new tokens per request (chunked-prefill continuations, prefix-cache hits, decodes in one call) -------
CTX = [0, 5, 16, 63, 100, 300, 1, 31]
QLENS = [1, 2, 17, 64, 65, 1, 33, 1]


def unified(ctx, qlens, H, Hkv, D, bs, dtype=torch.float32, seed=0, splits=1):
    """A step of requests with ctx cached tokens and qlens new ones (their K/V in the cache): output, reference."""
    lens = [c + n for c, n in zip(ctx, qlens)]
    _, kc, vc, tables, table = setup(lens, H, Hkv, D, bs, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    T = sum(qlens)
    q = torch.randn(T, H + 2 * Hkv, D, generator=g).to(DEV, dtype)[:, :H]  # strided rows, like a fused QKV
    start = [sum(qlens[:b]) for b in range(len(qlens))]
    as_t = dict(dtype=torch.int32, device=DEV)
    block_q = pa.block_q_for(max(qlens), H // Hkv)
    tiles = pa.query_tiles(qlens, block_q, DEV)
    out = pa.paged_attention_triton(q, kc, vc, table, torch.tensor(ctx, **as_t), torch.tensor(qlens, **as_t),
                                    torch.tensor(start, **as_t), tiles, bs, D ** -0.5, max(lens), splits=splits)
    ref = pa.paged_attention_ref(q, kc, vc, tables, ctx, qlens, bs, D ** -0.5)
    return out, ref


@in_process
@pytest.mark.parametrize("H,Hkv,D,bs", [(6, 2, 64, 16), (4, 4, 32, 16), (8, 1, 80, 8), (12, 1, 24, 32),
                                        (4, 2, 16, 64), (2, 2, 160, 16)])
@pytest.mark.parametrize("splits", [1, 3])
def test_unified_matches_naive_loop_fp32(H, Hkv, D, bs, splits):
    out, ref = unified(CTX, QLENS, H, Hkv, D, bs, splits=splits)
    assert out.shape == (sum(QLENS), H, D) and torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)


@in_process
@pytest.mark.parametrize("splits", [1, 4])
def test_unified_half_precision(splits):
    out, ref = unified(CTX, QLENS, 8, 2, 64, 16, dtype=torch.float16, seed=2, splits=splits)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref, atol=5e-3, rtol=5e-3)


@in_process
def test_unified_equals_decode_kernel_on_one_token_each():
    """q_lens all 1: the decode wrapper and the general call are the same computation."""
    lens = [1, 16, 17, 70]
    q, kc, vc, tables, table = setup(lens, 6, 2, 32, 16, seed=4)
    dec = run(q, kc, vc, table, lens, 16, 1)
    ref = pa.paged_attention_ref(q, kc, vc, tables, [n - 1 for n in lens], [1] * len(lens), 16, 32 ** -0.5)
    torch.testing.assert_close(dec.double().cpu(), ref, atol=2e-5, rtol=2e-5)


@in_process
@pytest.mark.parametrize("H,Hkv", [(6, 2), (64, 1)])
@pytest.mark.parametrize("qlens", [QLENS, [1] * len(CTX)])
def test_layer_takes_the_right_launch(H, Hkv, qlens, monkeypatch):
    """The attention layer on the Triton kernel: a step where every request decodes takes the decode launch,
    any step with a multi-token request the general one, whatever the tile height (64 query heads per KV head
    give one-token tiles: still the general launch)."""
    from packserve.layers import paged_attention_layer as layer
    from tests.support.engine_cases import batch_view

    monkeypatch.setattr(layer, "query_tiles", pa.query_tiles)  # the interpreted module's
    lens = [c + n for c, n in zip(CTX, qlens)]
    _, kc, vc, tables, _ = setup(lens, H, Hkv, 16, 16, seed=5)
    q = torch.randn(sum(qlens), H + 2 * Hkv, 16, generator=torch.Generator().manual_seed(6)).to(DEV)[:, :H]
    meta = layer.build_paged_meta(batch_view(tables, CTX, qlens, 16, device=DEV), 16, "triton", DEV)
    launches = []
    for name in ("paged_attention_triton", "paged_decode_attention_triton"):
        real = getattr(pa, name)
        monkeypatch.setattr(pa, name, lambda *a, _r=real, _n=name, **k: launches.append(_n) or _r(*a, **k))
    out = layer.paged_attention(q, kc, vc, meta, 16 ** -0.5)
    decode = max(qlens) == 1
    assert launches[0] == ("paged_decode_attention_triton" if decode else "paged_attention_triton")
    assert (meta.tiles is layer.DECODE_TILES) == decode
    torch.testing.assert_close(out.double().cpu(), pa.paged_attention_ref(q, kc, vc, tables, CTX, qlens, 16,
                                                                            16 ** -0.5), atol=2e-5, rtol=2e-5)
