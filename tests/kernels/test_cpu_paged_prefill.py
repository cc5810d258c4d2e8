"""The CPU operator for new tokens behind a cached context (paged_prefill_attention, kernels/csrc/varlen_attention.h)
against the naive fp64 paged loop: ragged cached lengths and query counts around its 32-query blocks, 256-key
chunks and the cache's blocks (0, 1, 15, 16, 17, 255, 256, 257, 600 cached; 1, 2, 31, 32, 33, 63, 64, 65, 300 new),
shuffled non-contiguous blocks, every slot no request owns NaN (a read outside a context shows), strided q rows
from a fused QKV output, GQA and MHA, query rows in any order with other rows between them; its dispatch in the
paged path; bad input refused; the fake implementation."""

import pytest
import torch

from packserve.kernels import cpu_lib
from packserve.kernels import cpu_ops as K
from packserve.kernels.paged_attention_triton import paged_attention_ref
from tests.support.engine_cases import paged_case

pytestmark = pytest.mark.usefixtures("each_isa")  # tests/kernels/conftest.py: every ISA build

CTX = [0, 1, 15, 16, 17, 255, 256, 257, 600]
NEW = [1, 2, 31, 32, 33, 63, 64, 65, 300]


def _case(ctx, new, H, Hkv, D, bs, seed=0, gap=0):
    """Caches holding each request's ctx + new tokens (tests/support/engine_cases.paged_case: shuffled blocks, NaN
    in every other slot) and q rows of the requests in order, `gap` unrelated rows before each, as column slices
    of a fused QKV output; returns q, caches, tables, the table tensor and the requests' first rows."""
    _, kc, vc, tables, table = paged_case([c + n for c, n in zip(ctx, new)], H, Hkv, D, bs, seed=seed)
    rows = sum(new) + gap * len(new)
    qkv = torch.randn(rows, (H + 2 * Hkv) * D, generator=torch.Generator().manual_seed(seed + 1))
    q = qkv[:, :H * D].view(rows, H, D)
    starts, r = [], 0
    for n in new:
        r += gap
        starts.append(r)
        r += n
    return q, kc, vc, tables, table, starts


def _run(q, kc, vc, table, ctx, new, starts, bs, scale):
    return K.paged_prefill_attention(q, kc, vc, table, torch.tensor([c + n for c, n in zip(ctx, new)]),
                                     torch.tensor(starts), torch.tensor(new), bs, scale)


def _ref(q, kc, vc, tables, ctx, new, starts, bs, scale):
    rows = torch.cat([q[s:s + n] for s, n in zip(starts, new)])
    return paged_attention_ref(rows, kc, vc, tables, ctx, new, bs, scale)


@pytest.mark.parametrize("H,Hkv,D,bs", [(6, 2, 64, 16), (4, 4, 32, 16), (8, 1, 80, 8), (3, 3, 24, 1)])
def test_matches_fp64_reference(H, Hkv, D, bs):
    q, kc, vc, tables, table, starts = _case(CTX, NEW, H, Hkv, D, bs, gap=3)
    assert not q.is_contiguous()
    out = _run(q, kc, vc, table, CTX, NEW, starts, bs, D ** -0.5)
    assert out.shape == (sum(NEW), H, D) and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _ref(q, kc, vc, tables, CTX, NEW, starts, bs, D ** -0.5),
                               atol=3e-6, rtol=3e-5)


@pytest.mark.parametrize("ctx,new", [([0], [700]), ([1000], [1]), ([5] * 12, [7] * 12), ([2047], [2]),
                                     ([300, 0, 64], [1, 513, 64])])
def test_single_and_many_requests(ctx, new):
    q, kc, vc, tables, table, starts = _case(ctx, new, 6, 2, 64, 16, seed=len(ctx))
    out = _run(q, kc, vc, table, ctx, new, starts, 16, 0.125)
    torch.testing.assert_close(out.double(), _ref(q, kc, vc, tables, ctx, new, starts, 16, 0.125),
                               atol=3e-6, rtol=3e-5)


def test_contexts_beyond_the_kept_scratch_go_in_groups():
    """The packed K/V kept between calls is bounded (256 MiB: 8 chunks of 256 keys at 64 KV heads of 256): the two
    1000-token contexts share a group, the 2100-token one exceeds the bound alone (a buffer of its own), the last
    goes in a group after it; every output equals the fp64 loop."""
    ctx, new = [1000, 1000, 2100, 20], [1, 2, 1, 2]
    q, kc, vc, tables, table, starts = _case(ctx, new, 64, 64, 256, 16, seed=9)
    out = _run(q, kc, vc, table, ctx, new, starts, 16, 256 ** -0.5)
    torch.testing.assert_close(out.double(), _ref(q, kc, vc, tables, ctx, new, starts, 16, 256 ** -0.5),
                               atol=3e-6, rtol=3e-5)


def test_no_cached_context_equals_the_packed_prefill_operator():
    """With nothing cached the operator is the packed prefill's attention over the same tokens, bit for bit."""
    lens = [1, 33, 300, 64]
    q, kc, vc, tables, table, starts = _case([0] * 4, lens, 6, 2, 64, 16, seed=2)
    out = _run(q, kc, vc, table, [0] * 4, lens, starts, 16, 0.125)
    slots = torch.tensor([tb[j // 16] * 16 + j % 16 for tb, n in zip(tables, lens) for j in range(n)])
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    assert torch.equal(out, K.varlen_attention(q, kc[slots], vc[slots], cu, 0.125))


def test_rejects_bad_input():
    q, kc, vc, tables, table, starts = _case([3, 20], [5, 9], 4, 2, 16, 4)
    seq, st, n = torch.tensor([8, 29]), torch.tensor(starts), torch.tensor([5, 9])
    ok = (q, kc, vc, table, seq, st, n, 4, 0.25)
    K.paged_prefill_attention(*ok)
    bad = {"fp32": (q.double(), *ok[1:]),
           "int64": (q, kc, vc, table.int(), *ok[4:]),
           "q_len <= seq_len": (q, kc, vc, table, torch.tensor([4, 29]), st, n, 4, 0.25),
           "query rows are outside q": (q, kc, vc, table, seq, torch.tensor([0, 10]), n, 4, 0.25),
           "outside the cache": (q, kc, vc, torch.full_like(table, 10 ** 6), *ok[4:]),
           "one row per request": (q, kc, vc, table[:1], *ok[4:]),
           "whole blocks": (q, kc[:-1], vc[:-1], *ok[3:])}
    for message, args in bad.items():
        with pytest.raises(RuntimeError, match=message):
            K.paged_prefill_attention(*args)


def test_fake_implementation_matches_the_operator():
    q, kc, vc, tables, table, starts = _case([3, 20], [5, 9], 4, 2, 16, 4)
    args = (q, kc, vc, table, torch.tensor([8, 29]), torch.tensor(starts), torch.tensor([5, 9]), 4, 0.25)
    torch.library.opcheck(cpu_lib.ops().paged_prefill_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
