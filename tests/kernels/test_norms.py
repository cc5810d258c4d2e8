"""Norm kernels vs independent fp64 references, over rows x widths x dtypes.

Without CUDA the Triton kernels run on CPU tensors in the Triton interpreter
(TRITON_INTERPRET=1, set below before the kernels are first imported); bf16 is wrong in
the interpreter, so bf16 runs only on a GPU. Every output is written into
a NaN-poisoned buffer (wider than the output, so stray writes show too).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

_MODULES = ("norm_utils", "rmsnorm", "layernorm", "crmsnorm")


def _import_kernels():
    """Import the kernel modules; if another test module imported them before the interpreter
    flag was set (their @triton.jit then compiled for a GPU), re-import them in dependency order."""
    mods = {m: importlib.import_module(f"packserve.kernels.{m}") for m in _MODULES}
    interpreted = type(mods["rmsnorm"]._rms_norm_kernel).__name__ == "InterpretedFunction"
    if not ON_GPU and not interpreted:
        mods = {m: importlib.reload(sys.modules[f"packserve.kernels.{m}"]) for m in _MODULES}
    return mods


_K = _import_kernels()
rmsnorm, layernorm, crmsnorm = _K["rmsnorm"], _K["layernorm"], _K["crmsnorm"]

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
ROWS = (1, 7, 83, 300)
WIDTHS = (8, 64, 768, 769, 1023, 4095)
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="bf16 is wrong in the Triton interpreter; checked on a GPU")
# Named ids, so `-k bfloat16` picks the GPU-only cases (benchmarks/gpu_check.sh).
DTYPES = (pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"),
          pytest.param(torch.bfloat16, marks=GPU_ONLY, id="bfloat16"))
# (atol, rtol): fp32 accumulation-order noise; half types allow ~2 ulp (Llama rounds twice).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
EPS = 1e-5


# ---- independent fp64 references (the semantics the kernels promise) ----------------------

def ref_rms(x: torch.Tensor, w: torch.Tensor | None, offset: float = 0.0) -> torch.Tensor:
    h = x.double()
    n = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    if w is None:
        return n
    if offset:
        return n * (offset + w.double())
    return n.to(x.dtype).double() * w.double()  # Llama: round, then weight


def ref_ln(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    h = x.double()
    c = h - h.mean(-1, keepdim=True)
    n = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + EPS)
    if w is not None:
        n = n * w.double()
    return n if b is None else n + b.double()


def ref_crms(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    # Rebuild the full zero-mean vector and take an ordinary RMS over width d = n + 1.
    h = x.double()
    full = torch.cat([h, -h.sum(-1, keepdim=True)], dim=-1)
    n = h / torch.sqrt(full.pow(2).mean(-1, keepdim=True) + EPS)
    return n if w is None else n.to(x.dtype).double() * w.double()


# ---- helpers ------------------------------------------------------------------------------

def inputs(rows: int, width: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 7919 + rows * 131 + width)
    x = torch.randn(rows, width, generator=g) * 2.0 + 0.5  # non-zero mean: LayerNorm must centre
    r = torch.randn(rows, width, generator=g)
    w = torch.randn(width, generator=g) * 0.5 + 1.0
    b = torch.randn(width, generator=g) * 0.2
    return [t.to(DEVICE, dtype) for t in (x, r, w, b)]


def poisoned(rows: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN buffer with 3 spare columns; returns (buffer, [rows, width] strided view into it)."""
    buf = torch.full((rows, width + 3), float("nan"), device=DEVICE, dtype=dtype)
    return buf, buf[:, :width]


def check(out: torch.Tensor, buf: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert not out.isnan().any(), "an output element was not written"
    assert buf[:, out.shape[1]:].isnan().all(), "a write landed outside the output"
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


# ---- the grid -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_rms_norm(width, dtype):
    for rows in ROWS:
        x, _, w, _ = inputs(rows, width, dtype)
        for weight, offset in ((w, 0.0), (w, 1.0), (None, 0.0)):
            buf, out = poisoned(rows, width, dtype)
            res = rmsnorm.rms_norm_triton(x, weight, EPS, offset=offset, out=out)
            assert res.data_ptr() == out.data_ptr()
            check(out, buf, ref_rms(x, weight, offset), dtype)


# Each fused add + norm kernel (with any out / inplace / block_n options) and its fp64 reference of the sum.
FUSED = {
    "rms": (lambda x, r, w, b, **kw: rmsnorm.fused_add_rms_norm_triton(x, r, w, EPS, **kw),
            lambda s, w, b: ref_rms(s, w)),
    "ln": (lambda x, r, w, b, **kw: layernorm.fused_add_layer_norm_triton(x, r, w, b, EPS, **kw),
           lambda s, w, b: ref_ln(s, w, b)),
    "crms": (lambda x, r, w, b, **kw: crmsnorm.fused_add_crms_norm_triton(x, r, EPS, w, **kw),
             lambda s, w, b: ref_crms(s, w)),
}


@pytest.mark.parametrize("norm", sorted(FUSED))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_fused_add_norm(width, dtype, norm):
    kernel, ref = FUSED[norm]
    for rows in ROWS:
        x, r, w, b = inputs(rows, width, dtype)
        buf, out = poisoned(rows, width, dtype)
        rbuf, res_out = poisoned(rows, width, dtype)
        kernel(x, r, w, b, out=out, residual_out=res_out)
        # The new residual is exactly an eager add in the input dtype; the output is its norm.
        assert torch.equal(res_out, x + r)
        assert rbuf[:, width:].isnan().all()
        check(out, buf, ref(x + r, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_layer_norm(width, dtype):
    for rows in ROWS:
        x, _, w, b = inputs(rows, width, dtype)
        for weight, bias in ((w, b), (None, None)):
            buf, out = poisoned(rows, width, dtype)
            layernorm.layer_norm_triton(x, weight, bias, EPS, out=out)
            check(out, buf, ref_ln(x, weight, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_crms_norm(width, dtype):
    for rows in ROWS:
        x, _, w, _ = inputs(rows, width, dtype)
        for weight in (None, w):
            buf, out = poisoned(rows, width, dtype)
            crmsnorm.crms_norm_triton(x, EPS, weight, out=out)
            check(out, buf, ref_crms(x, weight), dtype)


def test_crms_norm_equals_rms_norm_of_the_full_zero_mean_vector():
    """The defining property: CRMSNorm on d-1 coordinates == the first d-1 outputs of RMSNorm on z."""
    z = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = z - z.mean(-1, keepdim=True)
    full = rmsnorm.rms_norm_ref(z, None, EPS)
    torch.testing.assert_close(crmsnorm.crms_norm_ref(z[:, :-1], EPS), full[:, :-1], atol=0, rtol=1e-12)


def test_crms_norm_zero_padded_storage():
    """d-1 coordinates stored zero-padded to an aligned width give the unpadded result (full_width = d)."""
    for dtype in (torch.float32, torch.float16):
        x, r, w, _ = inputs(83, 767, dtype, seed=4)  # d = 768, stored in 776 columns
        pad = lambda t: torch.nn.functional.pad(t, (0, 9))  # noqa: E731
        buf, out = poisoned(83, 776, dtype)
        crmsnorm.crms_norm_triton(pad(x), EPS, pad(w), full_width=768, out=out)
        check(out, buf, pad(ref_crms(x, w)), dtype)
        buf, out = poisoned(83, 776, dtype)
        rbuf, res_out = poisoned(83, 776, dtype)
        crmsnorm.fused_add_crms_norm_triton(pad(x), pad(r), EPS, full_width=768, out=out, residual_out=res_out,
                                            block_n=256)
        check(out, buf, pad(ref_crms(x + r, None)), dtype)
        torch.testing.assert_close(crmsnorm.crms_norm_ref(pad(x), EPS, pad(w), full_width=768)[:, :767],
                                   crmsnorm.crms_norm_ref(x, EPS, w), atol=TOL[dtype][0], rtol=TOL[dtype][1])


# ---- the looping path (rows wider than one column block), forced at small widths ----------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("width,block_n", [(769, 256), (1023, 128), (4095, 1024), (64, 16)])
def test_column_loop(width, block_n, dtype):
    for rows in (1, 83):
        x, r, w, b = inputs(rows, width, dtype, seed=1)
        s = x + r
        cases = [
            (lambda o, ro: rmsnorm.rms_norm_triton(x, w, EPS, out=o, block_n=block_n), ref_rms(x, w), False),
            (lambda o, ro: rmsnorm.rms_norm_triton(x, w, EPS, offset=1.0, out=o, block_n=block_n),
             ref_rms(x, w, 1.0), False),
            (lambda o, ro: rmsnorm.fused_add_rms_norm_triton(x, r, w, EPS, out=o, residual_out=ro, block_n=block_n),
             ref_rms(s, w), True),
            (lambda o, ro: layernorm.layer_norm_triton(x, w, b, EPS, out=o, block_n=block_n), ref_ln(x, w, b), False),
            (lambda o, ro: layernorm.fused_add_layer_norm_triton(x, r, w, b, EPS, out=o, residual_out=ro,
                                                                 block_n=block_n), ref_ln(s, w, b), True),
            (lambda o, ro: crmsnorm.crms_norm_triton(x, EPS, w, out=o, block_n=block_n), ref_crms(x, w), False),
            (lambda o, ro: crmsnorm.fused_add_crms_norm_triton(x, r, EPS, out=o, residual_out=ro, block_n=block_n),
             ref_crms(s, None), True),
        ]
        for run, ref, fused in cases:
            buf, out = poisoned(rows, width, dtype)
            rbuf, res_out = poisoned(rows, width, dtype)
            run(out, res_out)
            check(out, buf, ref, dtype)
            if fused:
                assert torch.equal(res_out, s)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_rows_wider_than_the_largest_block_loop_by_default(dtype):
    from packserve.kernels.norm_utils import MAX_BLOCK_N, launch_config

    width = MAX_BLOCK_N + 3617  # also odd, and the last block is mostly masked
    assert not launch_config(3, width)[3]
    x, r, w, b = inputs(3, width, dtype, seed=3)
    buf, out = poisoned(3, width, dtype)
    rbuf, res_out = poisoned(3, width, dtype)
    rmsnorm.fused_add_rms_norm_triton(x, r, w, EPS, out=out, residual_out=res_out)
    check(out, buf, ref_rms(x + r, w), dtype)
    assert torch.equal(res_out, x + r)
    buf, out = poisoned(3, width, dtype)
    layernorm.layer_norm_triton(x, w, b, EPS, out=out)
    check(out, buf, ref_ln(x, w, b), dtype)
    buf, out = poisoned(3, width, dtype)
    crmsnorm.crms_norm_triton(x, EPS, out=out)
    check(out, buf, ref_crms(x, None), dtype)


# ---- in place ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(FUSED))
@pytest.mark.parametrize("block_n", [None, 256])
def test_fused_in_place(op, block_n, dtype):
    fn, ref = FUSED[op]
    for rows, width in ((7, 769), (83, 1023)):
        x, r, w, b = inputs(rows, width, dtype, seed=2)
        s = x + r
        xi, ri = x.clone(), r.clone()
        out, res = fn(xi, ri, w, b, inplace=True, block_n=block_n)
        assert out.data_ptr() == xi.data_ptr() and res.data_ptr() == ri.data_ptr()
        assert torch.equal(ri, s)
        torch.testing.assert_close(xi.double(), ref(s, w, b), atol=TOL[dtype][0], rtol=TOL[dtype][1])


# ---- shapes, strides, dispatch, validation ------------------------------------------------

def test_leading_dims_and_strided_rows():
    x3 = torch.randn(2, 5, 96, device=DEVICE)
    out = rmsnorm.rms_norm_triton(x3, None, EPS)
    assert out.shape == x3.shape
    torch.testing.assert_close(out.double(), ref_rms(x3, None), atol=2e-5, rtol=2e-5)
    # Rows with a stride larger than the width (a column slice of a wider buffer).
    wide = torch.randn(9, 200, device=DEVICE)
    x = wide[:, 10:110]
    w = torch.rand(100, device=DEVICE) + 0.5
    torch.testing.assert_close(rmsnorm.rms_norm_triton(x, w, EPS).double(), ref_rms(x, w), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(layernorm.layer_norm_triton(x, w, w, EPS).double(), ref_ln(x, w, w),
                               atol=2e-5, rtol=2e-5)
    # Heads sliced out of a fused QKV output (Qwen3's q/k norm): [tokens, heads, head_dim], token stride of the
    # whole row, so the leading dims do not collapse into one row stride: read through a copy.
    for tokens in (1, 2, 5):
        qkv = torch.randn(tokens, (4 + 2 + 2) * 32, device=DEVICE)
        q = qkv[:, :4 * 32].view(tokens, 4, 32)
        k = qkv[:, 4 * 32:6 * 32].view(tokens, 2, 32)
        for t in (q, k):
            wt = torch.rand(32, device=DEVICE) + 0.5
            for got, want in ((rmsnorm.rms_norm_triton(t, wt, EPS), ref_rms(t, wt)),
                              (layernorm.layer_norm_triton(t, wt, wt, EPS), ref_ln(t, wt, wt)),
                              (crmsnorm.crms_norm_triton(t, EPS, wt), ref_crms(t, wt))):
                assert got.shape == t.shape
                torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_zero_rows():
    x = torch.empty(0, 64, device=DEVICE)
    assert rmsnorm.rms_norm_triton(x, None, EPS).shape == (0, 64)
    out, res = layernorm.fused_add_layer_norm_triton(x, x.clone(), None, None, EPS)
    assert out.shape == res.shape == (0, 64)


@pytest.mark.parametrize("cpu_kernels", ["1", "0"])
def test_cpu_dispatch_matches_reference(cpu_kernels, monkeypatch):
    """CPU fp32 RMSNorm runs packserve's C kernel (summation order differs: close) or, with
    PACKSERVE_CPU_KERNELS=0, torch's rms_norm (bitwise the reference); the rest is the reference itself."""
    monkeypatch.setenv("PACKSERVE_CPU_KERNELS", cpu_kernels)
    x, r, w, b = (t.cpu() for t in inputs(7, 769, torch.float32))
    same = torch.equal if cpu_kernels == "0" else functools.partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)
    for got, want in [(rmsnorm.rms_norm(x, w, EPS), rmsnorm.rms_norm_ref(x, w, EPS)),
                      (rmsnorm.rms_norm(x, w, EPS, offset=1.0), rmsnorm.rms_norm_ref(x, w, EPS, offset=1.0)),
                      *zip(rmsnorm.fused_add_rms_norm(x, r, w, EPS), rmsnorm.fused_add_rms_norm_ref(x, r, w, EPS))]:
        assert same(got, want) in (True, None)
    assert torch.equal(layernorm.layer_norm(x, w, b, EPS), layernorm.layer_norm_ref(x, w, b, EPS))
    for got, want in zip(layernorm.fused_add_layer_norm(x, r, w, b, EPS),
                         layernorm.fused_add_layer_norm_ref(x, r, w, b, EPS)):
        assert torch.equal(got, want)
    assert torch.equal(crmsnorm.crms_norm(x, EPS), crmsnorm.crms_norm_ref(x, EPS))
    # The references agree with the fp64 semantics too.
    torch.testing.assert_close(rmsnorm.rms_norm_ref(x, w, EPS).double(), ref_rms(x, w), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(layernorm.layer_norm_ref(x, w, b, EPS).double(), ref_ln(x, w, b), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(crmsnorm.crms_norm_ref(x, EPS, w).double(), ref_crms(x, w), atol=2e-5, rtol=2e-5)
    # In-place reference path writes where the kernel would.
    xi, ri = x.clone(), r.clone()
    rmsnorm.fused_add_rms_norm(xi, ri, w, EPS, inplace=True)
    assert torch.equal(ri, x + r) and same(xi, rmsnorm.rms_norm_ref(x + r, w, EPS)) in (True, None)


def test_reference_matches_transformers_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        m = LlamaRMSNorm(96, eps=EPS).to(dtype)
        with torch.no_grad():
            m.weight.copy_(torch.randn(96))
            x = torch.randn(4, 96).to(dtype)
            assert torch.equal(rmsnorm.rms_norm_ref(x, m.weight, EPS), m(x))


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_dispatch_uses_triton_on_cuda(monkeypatch):
    called = []
    monkeypatch.setattr(rmsnorm, "rms_norm_triton", lambda *a, **k: called.append(1) or a[0])
    x = torch.randn(4, 64, device="cuda")
    rmsnorm.rms_norm(x, None, EPS)
    assert called


def test_validation():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="stride 1"):
        rmsnorm.rms_norm_triton(x.t(), None, EPS)
    with pytest.raises(TypeError, match="dtype"):
        rmsnorm.rms_norm_triton(x.double(), None, EPS)
    with pytest.raises(TypeError, match="dtype"):
        layernorm.layer_norm_triton(x.to(torch.int32), None, None, EPS)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm.rms_norm_triton(x, torch.ones(63, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm.fused_add_rms_norm_triton(x, torch.randn(4, 65, device=DEVICE), None, EPS)
    with pytest.raises(ValueError, match="residual"):
        crmsnorm.fused_add_crms_norm_triton(x, x.half(), EPS)
    with pytest.raises(ValueError, match="out"):
        layernorm.layer_norm_triton(x, None, None, EPS, out=torch.empty(4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="different"):
        o = torch.empty_like(x)
        rmsnorm.fused_add_rms_norm_triton(x, x.clone(), None, EPS, out=o, residual_out=o)
    with pytest.raises(ValueError, match="power of two"):
        rmsnorm.rms_norm_triton(x, None, EPS, block_n=48)
    with pytest.raises(ValueError, match="rows"):  # an input the op writes (in place) is never copied
        rmsnorm.fused_add_rms_norm_triton(torch.randn(4, 6, 64, device=DEVICE).transpose(0, 1),
                                          torch.randn(6, 4, 64, device=DEVICE), None, EPS, inplace=True)
