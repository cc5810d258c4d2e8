"""The Triton paged decode kernel (GPU decode path) against the naive fp64 loop and the torch gather + SDPA path:
ragged context lengths, every block size, GQA / MHA / MQA, head dims that are not powers of two, splits (with
empty ones), strided q rows, NaN-poisoned cache slots outside the requests' contexts.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported; when
an earlier test module imported triton without it, `test_interpreter_checks_in_subprocess` runs this file in a
fresh interpreter). fp32 and fp16 here; bf16 only on a GPU (DESIGN.md §9).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402  (after the flag, on purpose)

IN_PROCESS = ON_GPU or type(tl.standard.sum).__name__ == "InterpretedFunction"


def _import_kernel():
    pa = importlib.import_module("packserve.kernels.paged_attention")
    if not ON_GPU and IN_PROCESS and type(pa._decode_kernel).__name__ != "InterpretedFunction":
        pa = importlib.reload(sys.modules["packserve.kernels.paged_attention"])
    return pa


pa = _import_kernel()
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported without TRITON_INTERPRET; "
                                                       "test_interpreter_checks_in_subprocess runs these")


@pytest.mark.skipif(IN_PROCESS, reason="the checks run in this process")
def test_interpreter_checks_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONSAFEPATH="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                        str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "test_interpreter_checks_in_subprocess" not in r.stdout


DEV = torch.device("cuda" if ON_GPU else "cpu")
LENS = [1, 2, 15, 16, 17, 63, 64, 65, 300, 3]


def setup(lens, H, Hkv, D, bs, dtype=torch.float32, seed=0):
    """NaN outside the requests' slots, shuffled non-contiguous block tables, q a strided view (fused QKV rows)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // bs) for n in lens) + 7
    k_cache = torch.full((nblocks * bs, Hkv, D), float("nan"))
    v_cache = torch.full((nblocks * bs, Hkv, D), float("nan"))
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, i = [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(perm[i:i + nb])
        i += nb
        for j in range(n):
            slot = tables[-1][j // bs] * bs + j % bs
            k_cache[slot] = torch.randn(Hkv, D, generator=g)
            v_cache[slot] = torch.randn(Hkv, D, generator=g)
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), H + 2 * Hkv, D, generator=g)[:, :H]
    to = dict(device=DEV, dtype=dtype)
    return q.to(**to), k_cache.to(**to), v_cache.to(**to), tables, table.to(DEV)


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
    from packserve.layers.attention import PagedGroup, PagedMeta, paged_attention

    H, Hkv, D, bs = 6, 2, 64, 16
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs, seed=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # the gather path reads whole blocks (masked afterwards)
    B, nb = len(LENS), table.shape[1]
    valid = torch.arange(nb * bs, device=DEV)[None, :] < torch.tensor(LENS, device=DEV)[:, None]
    mask = torch.zeros(B, 1, 1, nb * bs, device=DEV).masked_fill_(~valid.view(B, 1, 1, -1), float("-inf"))
    group = PagedGroup(None, torch.arange(B, device=DEV), table.long(), mask, B, 1)
    want = paged_attention(q, kc, vc, PagedMeta(B, [group]), D ** -0.5)
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
