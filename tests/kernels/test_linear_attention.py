"""Linear attention: the chain of trust naive loop == quadratic form; recurrent kernel == naive; chunked
kernel == recurrent, over packed ragged sequences; packed == per-sequence; split-and-resume == one call;
decode steps == the recurrence; every feature map, normalized and not, GQA, odd widths.

Without CUDA the Triton kernels run on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1). The flag
must be set before triton.language is first imported: its library functions (tl.sum, tl.zeros, ...) are
decorated at import. When an earlier test module imported triton without it, these tests cannot run in this
process: they are skipped here and `test_interpreter_checks_in_subprocess` runs this file in a fresh
interpreter instead. fp32 and fp16 run in the interpreter; bf16 only on a GPU (the interpreter's bf16 is wrong).
Every buffer the Triton wrappers allocate is filled with NaN first, so an unwritten element fails.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from tests.support.interpreter import (interpreted_module, run_tests_in_interpreter,  # noqa: E402
                                       triton_interpreted)

IN_PROCESS = ON_GPU or triton_interpreted()
la = importlib.import_module("packserve.kernels.linear_attention")
lt = importlib.import_module("packserve.kernels.linear_attention_torch")
tr = interpreted_module("packserve.kernels.linear_attention_triton", "_chunk_state_kernel")
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported without TRITON_INTERPRET; "
                                                       "test_interpreter_checks_in_subprocess runs these")


@pytest.mark.skipif(IN_PROCESS, reason="the checks run in this process")
def test_interpreter_checks_in_subprocess():
    run_tests_in_interpreter(__file__)


DEV = torch.device("cuda" if ON_GPU else "cpu")
LENS = (1, 15, 63, 64, 65, 300, 1000)
MAPS = ("elu1", "relu", "nalaformer")
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="bf16 is wrong in the Triton interpreter; checked on a GPU")
TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_rmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten poisoned elements?)"
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def cu_of(lens) -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEV)


def make_inputs(lens=LENS, hq=2, hkv=1, dk=16, dv=32, fm="elu1", dtype=torch.float32, seed=0):
    """Feature-mapped q/k, v, cu_seqlens. Inputs are rounded to `dtype`; references read them upcast."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = torch.randn(T, hq, dk, generator=g)
    k = torch.randn(T, hkv, dk, generator=g)
    v = torch.randn(T, hkv, dv, generator=g)
    q, k = la.apply_feature_map(q, k, fm)
    return q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), cu_of(lens)


def random_state(n, hkv, dk, dv, seed=1):
    """A plausible state: sums of non-negative keys times values."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, hkv, dk, generator=g) * 20
    S = torch.randn(n, hkv, dk, dv, generator=g) * 5
    return S.to(DEV), z.to(DEV)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(tr, "POISON_ALLOCATIONS", True)


# The recurrent kernel is the slow link in the interpreter (a Python step per token): compute each
# configuration once and let the chunked-vs-recurrent checks reuse it.
_RECURRENT: dict = {}


def recurrent_case(fm: str, normalize: bool, with_state: bool):
    key = (fm, normalize, with_state)
    if key not in _RECURRENT:
        q, k, v, cu = make_inputs(fm=fm)
        init = random_state(len(LENS), 1, k.shape[-1], v.shape[-1]) if with_state else None
        o, st = tr.linear_attention_recurrent_triton(q, k, v, cu, normalize=normalize, initial_state=init)
        _RECURRENT[key] = (q, k, v, cu, init, o, st)
    return _RECURRENT[key]


RECURRENT_CASES = [("elu1", True, False), ("relu", True, False), ("nalaformer", True, False),
                   ("elu1", False, False), ("nalaformer", True, True)]


# ---- link 0: two independent references agree ---------------------------------------------------------

@pytest.mark.parametrize("fm", MAPS)
@pytest.mark.parametrize("normalize", (True, False))
@pytest.mark.parametrize("heads", ((4, 2), (3, 3)))
@pytest.mark.parametrize("with_state", (False, True))
@in_process
def test_naive_equals_quadratic(fm, normalize, heads, with_state):
    q, k, v, cu = make_inputs(hq=heads[0], hkv=heads[1], dk=8, dv=12, fm=fm)
    init = random_state(len(LENS), heads[1], k.shape[-1], v.shape[-1]) if with_state else None
    o_naive, _ = lt.linear_attention_naive(q, k, v, cu, normalize=normalize, initial_state=init)
    o_quad = lt.linear_attention_quadratic(q, k, v, cu, normalize=normalize, initial_state=init)
    assert rel_rmse(o_naive, o_quad) < 1e-5


@in_process
def test_checks_can_fail():
    """The metric sees a state leaking across a sequence boundary, and a missing normalization."""
    q, k, v, cu = make_inputs(lens=(40, 80))
    ref, _ = lt.linear_attention_naive(q, k, v, cu)
    merged, _ = lt.linear_attention_naive(q, k, v, cu_of((120,)))
    assert rel_rmse(merged, ref) > 1e-2
    unnorm, _ = lt.linear_attention_naive(q, k, v, cu, normalize=False)
    assert rel_rmse(unnorm, ref) > 1e-2


# ---- link 1: recurrent kernel == naive loop; link 2: chunked kernel == recurrent kernel -----------------

@pytest.mark.parametrize("case", RECURRENT_CASES, ids=lambda c: "-".join(map(str, c)))
@in_process
def test_recurrent_equals_naive(case):
    q, k, v, cu, init, o, (S, z) = recurrent_case(*case)
    o_ref, (S_ref, z_ref) = lt.linear_attention_naive(q, k, v, cu, normalize=case[1], initial_state=init)
    assert rel_rmse(o, o_ref) < 1e-3
    assert rel_rmse(S, S_ref) < 1e-3 and rel_rmse(z, z_ref) < 1e-3


@pytest.mark.parametrize("case", RECURRENT_CASES, ids=lambda c: "-".join(map(str, c)))
@in_process
def test_chunked_equals_recurrent(case):
    q, k, v, cu, init, o_rec, (S_rec, z_rec) = recurrent_case(*case)
    o, (S, z) = tr.linear_attention_chunked_triton(q, k, v, cu, normalize=case[1], initial_state=init,
                                                   cu_seqlens_cpu=cu.tolist())
    assert S.dtype == torch.float32 and z.dtype == torch.float32
    assert rel_rmse(o, o_rec) < 1e-3
    assert rel_rmse(S, S_rec) < 1e-3 and rel_rmse(z, z_rec) < 1e-3


# ---- the chunked paths against the naive loop over a wider grid --------------------------------------

GRID = [pytest.param(fm, norm, heads, dims, id=f"{fm}-{'norm' if norm else 'raw'}-h{heads[0]}x{heads[1]}-d{dims[0]}x{dims[1]}")
        for fm in MAPS for norm in (True, False) for heads in ((4, 2), (2, 2)) for dims in ((16, 32), (20, 24))
        if not (dims == (20, 24) and heads == (2, 2))]


_NAIVE: dict = {}


@pytest.mark.parametrize("fm, normalize, heads, dims", GRID)
@pytest.mark.parametrize("impl", ("triton", "torch"))
@in_process
def test_chunked_equals_naive(impl, fm, normalize, heads, dims):
    key = (fm, normalize, heads, dims)
    if key not in _NAIVE:  # shared by both implementations: the Python loop is not free either
        q, k, v, cu = make_inputs(hq=heads[0], hkv=heads[1], dk=dims[0], dv=dims[1], fm=fm)
        _NAIVE[key] = (q, k, v, cu, lt.linear_attention_naive(q, k, v, cu, normalize=normalize))
    q, k, v, cu, (o_ref, (S_ref, z_ref)) = _NAIVE[key]
    fn = tr.linear_attention_chunked_triton if impl == "triton" else lt.linear_attention_chunked_torch
    o, (S, z) = fn(q, k, v, cu, normalize=normalize)
    assert rel_rmse(o, o_ref) < 1e-3
    assert rel_rmse(S, S_ref) < 1e-3 and rel_rmse(z, z_ref) < 1e-3


@pytest.mark.parametrize("dtype", (pytest.param(torch.float16, id="float16"),
                                   pytest.param(torch.bfloat16, marks=GPU_ONLY, id="bfloat16")))
@pytest.mark.parametrize("fm", ("elu1", "nalaformer"))
@in_process
def test_chunked_half_inputs(dtype, fm):
    q, k, v, cu = make_inputs(hq=4, hkv=2, fm=fm, dtype=dtype)
    init = random_state(len(LENS), 2, k.shape[-1], v.shape[-1])
    o, (S, z) = tr.linear_attention_chunked_triton(q, k, v, cu, initial_state=init)
    assert o.dtype == dtype and S.dtype == torch.float32
    o_ref, (S_ref, z_ref) = lt.linear_attention_naive(q.float(), k.float(), v.float(), cu, initial_state=init)
    assert rel_rmse(o, o_ref) < TOL[dtype]
    assert rel_rmse(S, S_ref) < TOL[dtype] and rel_rmse(z, z_ref) < TOL[dtype]


@in_process
def test_recurrent_half_inputs():
    q, k, v, cu = make_inputs(lens=(15, 65, 130), fm="elu1", dtype=torch.float16)
    o, (S, _) = tr.linear_attention_recurrent_triton(q, k, v, cu)
    o_ref, (S_ref, _) = lt.linear_attention_naive(q.float(), k.float(), v.float(), cu)
    assert o.dtype == torch.float16
    assert rel_rmse(o, o_ref) < 5e-3 and rel_rmse(S, S_ref) < 5e-3


# ---- packing and state hand-over -------------------------------------------------------------------

@pytest.mark.parametrize("impl", ("triton", "torch"))
@in_process
def test_packed_equals_per_sequence_calls(impl):
    fn = tr.linear_attention_chunked_triton if impl == "triton" else lt.linear_attention_chunked_torch
    q, k, v, cu = make_inputs(hq=4, hkv=2, fm="nalaformer")
    o, (S, z) = fn(q, k, v, cu)
    bounds = cu.tolist()
    for n in range(len(LENS)):
        a, b = bounds[n], bounds[n + 1]
        o_n, (S_n, z_n) = fn(q[a:b], k[a:b], v[a:b], cu_of((b - a,)))
        assert rel_rmse(o[a:b], o_n) < 1e-5
        assert rel_rmse(S[n:n + 1], S_n) < 1e-5 and rel_rmse(z[n:n + 1], z_n) < 1e-5


@pytest.mark.parametrize("impl", ("triton", "torch"))
@pytest.mark.parametrize("normalize", (True, False))
@in_process
def test_split_and_resume_equals_one_call(impl, normalize):
    fn = tr.linear_attention_chunked_triton if impl == "triton" else lt.linear_attention_chunked_torch
    q, k, v, cu = make_inputs(hq=4, hkv=2, fm="elu1")
    o, (S, z) = fn(q, k, v, cu, normalize=normalize)
    # Split points: at the start, mid-chunk, on a chunk boundary, at the end.
    cuts = [0, 7, 63, 64, 1, 150, 1000]
    bounds = cu.tolist()
    first = [torch.arange(bounds[n], bounds[n] + c) for n, c in enumerate(cuts)]
    second = [torch.arange(bounds[n] + c, bounds[n + 1]) for n, c in enumerate(cuts)]
    i1, i2 = torch.cat(first).to(DEV), torch.cat(second).to(DEV)
    o1, st1 = fn(q[i1], k[i1], v[i1], cu_of(cuts), normalize=normalize)
    o2, (S2, z2) = fn(q[i2], k[i2], v[i2], cu_of([l - c for l, c in zip(LENS, cuts)]), normalize=normalize,
                      initial_state=st1)
    assert rel_rmse(o1, o[i1]) < 1e-5 and rel_rmse(o2, o[i2]) < 1e-4
    assert rel_rmse(S2, S) < 1e-5 and rel_rmse(z2, z) < 1e-5


@in_process
def test_empty_sequences_keep_their_state():
    q, k, v, cu = make_inputs(lens=(0, 5, 0, 70))
    init = random_state(4, 1, 16, 32)
    for fn in (tr.linear_attention_chunked_triton, tr.linear_attention_recurrent_triton,
               lt.linear_attention_chunked_torch):
        o, (S, z) = fn(q, k, v, cu, initial_state=init)
        o_ref, (S_ref, z_ref) = lt.linear_attention_naive(q, k, v, cu, initial_state=init)
        assert rel_rmse(o, o_ref) < 1e-5 and rel_rmse(S, S_ref) < 1e-5 and rel_rmse(z, z_ref) < 1e-5
        assert torch.equal(S[0], init[0][0]) and torch.equal(z[2], init[1][2])


@in_process
def test_no_final_state_and_host_copy_needs_no_device_read(monkeypatch):
    q, k, v, cu = make_inputs(lens=(3, 70), hq=4, hkv=2)
    host = cu.tolist()
    o_ref = lt.linear_attention_naive(q, k, v, cu)[0]

    def guard(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **kw):
            if self is cu:
                raise AssertionError("cu_seqlens was read back to the host")
            return real(self, *a, **kw)
        return read

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "__int__", "__index__", "numpy", "__iter__"):
            m.setattr(torch.Tensor, name, guard(name))
        o, st = tr.linear_attention_chunked_triton(q, k, v, cu, output_final_state=False, cu_seqlens_cpu=host)
        with pytest.raises(AssertionError, match="read back"):  # the check itself works
            tr.linear_attention_chunked_triton(q, k, v, cu)
    assert st is None
    assert rel_rmse(o, o_ref) < 1e-3


# ---- decode ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ("triton", "torch"))
@pytest.mark.parametrize("fm, normalize", (("elu1", True), ("nalaformer", True), ("relu", False)))
@in_process
def test_prefill_then_decode_equals_naive(impl, fm, normalize):
    """Prefill prompts (chunked), keep their states in a shuffled slot pool, then decode 3 tokens each."""
    step = tr.linear_attention_decode_step_triton if impl == "triton" else lt.linear_attention_decode_step_torch
    prompt, new = (1, 15, 64, 65, 130), 3
    full = [p + new for p in prompt]
    q, k, v, cu_full = make_inputs(lens=full, hq=4, hkv=2, fm=fm)
    o_ref, (S_ref, z_ref) = lt.linear_attention_naive(q, k, v, cu_full, normalize=normalize)
    bounds = cu_full.tolist()
    pre = torch.cat([torch.arange(bounds[n], bounds[n] + p) for n, p in enumerate(prompt)]).to(DEV)
    _, (S, z) = tr.linear_attention_chunked_triton(q[pre], k[pre], v[pre], cu_of(prompt), normalize=normalize)
    slots = torch.tensor([6, 2, 0, 5, 3], device=DEV)
    S_pool = torch.full((8, *S.shape[1:]), float("nan"), device=DEV)
    z_pool = torch.full((8, *z.shape[1:]), float("nan"), device=DEV)
    S_pool[slots], z_pool[slots] = S, z
    for j in range(new):
        t = torch.tensor([bounds[n] + p + j for n, p in enumerate(prompt)], device=DEV)
        # Out of place first: must match in place and leave the pool alone.
        o2, S2, z2 = step(q[t], k[t], v[t], S_pool, z_pool, normalize=normalize, state_indices=slots, inplace=False)
        before = S_pool.clone()
        o, S_out, z_out = step(q[t], k[t], v[t], S_pool, z_pool, normalize=normalize, state_indices=slots)
        assert S_out is S_pool and z_out is z_pool
        assert rel_rmse(o, o_ref[t]) < 1e-4
        assert torch.allclose(o2, o) and torch.allclose(S2, S_pool[slots]) and torch.allclose(z2, z_pool[slots])
        assert torch.equal(S_pool[1].isnan(), before[1].isnan())  # unused slots untouched
    assert rel_rmse(S_pool[slots], S_ref) < 1e-4 and rel_rmse(z_pool[slots], z_ref) < 1e-4


@in_process
def test_decode_step_without_indices_and_wide_state():
    """States indexed by batch position; Dk' = 128 > one Dv block, Dv = 80 spans several blocks."""
    g = torch.Generator().manual_seed(3)
    B, hq, hkv, dk, dv = 3, 4, 1, 64, 80
    q, k = la.apply_feature_map(torch.randn(B, hq, dk, generator=g), torch.randn(B, hkv, dk, generator=g), "nalaformer")
    v = torch.randn(B, hkv, dv, generator=g)
    S0, z0 = random_state(B, hkv, 2 * dk, dv)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    o_ref, S_ref, z_ref = lt.linear_attention_decode_step_torch(q, k, v, S0.clone(), z0.clone())
    o, S, z = tr.linear_attention_decode_step_triton(q, k, v, S0.clone(), z0.clone())
    assert rel_rmse(o, o_ref) < 1e-5 and rel_rmse(S, S_ref) < 1e-6 and rel_rmse(z, z_ref) < 1e-6
    # And against the independent naive loop (B one-token sequences resuming from S0, z0).
    o_nv, (S_nv, z_nv) = lt.linear_attention_naive(q, k, v, cu_of([1] * B), initial_state=(S0.clone(), z0.clone()))
    assert rel_rmse(o, o_nv) < 1e-5 and rel_rmse(S, S_nv) < 1e-6 and rel_rmse(z, z_nv) < 1e-6


# ---- feature maps and the public API ----------------------------------------------------------------

@in_process
def test_feature_maps_formulas():
    x = torch.tensor([[3.0, -4.0, 0.0]])              # ||x|| = 5
    p = 3 * (0.5 + torch.tanh(torch.tensor(5.0)))
    expected_q = torch.tensor([[(3 / 5) ** p, 0.0, 0.0, 0.0, (4 / 5) ** p, 0.0]])
    assert torch.allclose(la.nalaformer_q(x), expected_q)
    assert torch.allclose(la.nalaformer_k(x), torch.tensor([[27.0, 0, 0, 0, 64.0, 0]]))
    assert torch.equal(la.nalaformer_q(torch.zeros(1, 4)), torch.zeros(1, 8))  # q = 0: no NaN
    assert torch.allclose(la.elu1(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([torch.e ** -1, 1.0, 3.0]))
    assert torch.equal(la.relu_map(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
    assert la.feature_width("nalaformer", 16) == 32 and la.feature_width("elu1", 16) == 16


@pytest.mark.parametrize("fm", MAPS)
@in_process
def test_feature_maps_non_negative_and_per_token(fm):
    x = torch.randn(50, 3, 8)
    fq, fk = la.FEATURE_MAPS[fm]
    for phi in (fq, fk):
        y = phi(x)
        assert (y >= 0).all()
        # Causal: a token's features depend on that token alone (no sequence statistics).
        assert torch.allclose(phi(x[17:18]), y[17:18])


@pytest.mark.parametrize("fm", MAPS)
@in_process
def test_public_api_cpu_dispatch(fm):
    g = torch.Generator().manual_seed(5)
    lens = (5, 70)
    q, k = torch.randn(75, 4, 16, generator=g), torch.randn(75, 2, 16, generator=g)
    v = torch.randn(75, 2, 16, generator=g)
    cu = cu_of(lens).cpu()
    o, (S, z) = la.linear_attention_chunked(q, k, v, cu, feature_map=fm, cu_seqlens_cpu=[0, 5, 75])
    pq, pk = la.apply_feature_map(q, k, fm)
    o_ref, (S_ref, z_ref) = lt.linear_attention_naive(pq, pk, v, cu)
    assert rel_rmse(o, o_ref) < 1e-5 and rel_rmse(S, S_ref) < 1e-5
    # One decode step through the public API continues the same recurrence.
    q1, k1, v1 = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    o1, _, _ = la.linear_attention_decode_step(q1, k1, v1, S, z, feature_map=fm)
    cat = lambda a, b: torch.cat([a[:5], b[:1], a[5:], b[1:]])  # noqa: E731
    o_all, _ = lt.linear_attention_naive(*la.apply_feature_map(cat(q, q1), cat(k, k1), fm), cat(v, v1), cu_of((6, 71)).cpu())
    assert rel_rmse(o1, o_all[[5, 76]]) < 1e-5


@in_process
def test_bad_inputs_are_rejected():
    q, k, v, cu = make_inputs(lens=(4, 4), hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        la.linear_attention_chunked(q, k, v, cu)
    q, k, v, cu = make_inputs(lens=(4, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        la.linear_attention_chunked(q, k, v, torch.tensor([0, 4, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="initial_state"):
        la.linear_attention_chunked(q, k, v, cu, initial_state=random_state(3, 1, 16, 32))
    with pytest.raises(ValueError, match="unknown feature map"):
        la.linear_attention_chunked(q, k, v, cu, feature_map="softmax")
