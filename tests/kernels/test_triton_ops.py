"""The Triton kernels as torch operators (packserve.kernels.triton_ops): opcheck (schema, fake vs real outputs,
no hidden aliasing or mutation) and a torch.compile trace with no graph break, in the Triton interpreter on CPU
(on a GPU host, on CUDA tensors)."""

import pytest
import torch

from packserve.kernels import triton_ops
from packserve.kernels.norm_utils import interpreting
from packserve.kernels.paged_attention_triton import paged_decode_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEV == "cpu" and not interpreting(), reason="needs TRITON_INTERPRET=1 on CPU")
ops = triton_ops.ops()


def _norm_cases():
    g = torch.Generator().manual_seed(0)
    x, r, w, b = (torch.randn(5, 33, generator=g).to(DEV) for _ in range(4))
    w33 = w[0]
    return [
        (ops.rms_norm, (x, w33, 1e-6, 0.0)),
        (ops.rms_norm, (x, None, 1e-6, 1.0)),
        (ops.add_rms_norm, (x, r, w33, 1e-6, 0.0)),
        (ops.layer_norm, (x, w33, b[0], 1e-5)),
        (ops.add_layer_norm, (x, r, w33, None, 1e-5)),
        (ops.crms_norm, (x, 1e-5, None, 34)),
        (ops.add_crms_norm, (x, r, 1e-5, w33, None)),
    ]


def _paged_case(B=3, H=4, Hkv=2, D=16, bs=4, lens=(1, 6, 9)):
    g = torch.Generator().manual_seed(1)
    nb = 12
    k = torch.randn(nb * bs, Hkv, D, generator=g).to(DEV)
    v = torch.randn(nb * bs, Hkv, D, generator=g).to(DEV)
    table = torch.randperm(nb, generator=g)[:B * 3].view(B, 3).to(DEV)
    q = torch.randn(B, H, D, generator=g).to(DEV)
    return q, k, v, table, torch.tensor(lens, device=DEV)


@pytest.mark.parametrize("case", range(7))
def test_norm_operators_pass_opcheck(case):
    op, args = _norm_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_paged_operators_pass_opcheck_and_match_the_reference():
    q, k, v, table, lens = _paged_case()
    args = (q, k, v, table, lens, 4, 0.25, 16)
    torch.library.opcheck(ops.paged_decode_attention, args, test_utils=("test_schema", "test_faketensor"))
    out = ops.paged_decode_attention(*args)
    ref = paged_decode_ref(q, k, v, table.tolist(), lens.tolist(), 4, 0.25)
    assert (out.double().cpu() - ref).abs().max() <= 1e-4 * ref.abs().max()
    B = q.shape[0]
    ones, ar = torch.ones(B, dtype=torch.long, device=DEV), torch.arange(B, device=DEV)
    tiles = (ar.int(), torch.zeros(B, dtype=torch.int32, device=DEV))
    unified = (q, k, v, table, lens - 1, ones, ar, *tiles, 1, 4, 0.25, 16)
    torch.library.opcheck(ops.paged_attention, unified, test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(ops.paged_attention(*unified), out)


def test_a_layer_of_operators_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break: a raw Triton launch or a host read would be one."""
    q, k, v, table, lens = _paged_case()
    x = torch.randn(3, 64, device=DEV)
    w = torch.ones(64, device=DEV)

    def layer(x, r):
        h, r = ops.add_rms_norm(x, r, w, 1e-6, 0.0)
        att = ops.paged_decode_attention(h.view(3, 4, 16), k, v, table, lens, 4, 0.25, 16)
        return ops.rms_norm(att.reshape(3, 64), w, 1e-6, 0.0), r

    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    got, ref = compiled(x, x * 0.5), layer(x, x * 0.5)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_a_reloaded_kernel_file_registers_again():
    """The tests reload kernel modules to switch the interpreter on: the operators then run the reloaded code."""
    import importlib

    import packserve.kernels.rmsnorm as rmsnorm

    x = torch.randn(3, 8, device=DEV)
    before = ops.rms_norm(x, None, 1e-6, 0.0)
    reloaded = importlib.reload(rmsnorm)
    calls, real = [], reloaded.rms_norm_triton
    reloaded.rms_norm_triton = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert torch.equal(ops.rms_norm(x, None, 1e-6, 0.0), before) and calls
    finally:
        reloaded.rms_norm_triton = real
