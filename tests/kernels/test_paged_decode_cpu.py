"""The CPU paged decode kernel against a naive fp64 loop and against the torch gather + SDPA path."""

import pytest
import torch

from packserve.kernels import paged_decode_cpu as K
from packserve.layers.attention import PagedGroup, PagedMeta, paged_attention

pytestmark = pytest.mark.skipif(not K.available(), reason="no C compiler here")

LENS = [1, 2, 15, 16, 17, 63, 64, 65, 300, 3]


def setup(lens, H, Hkv, D, bs, seed=0):
    """A NaN-poisoned cache with only the requests' slots written, non-contiguous shuffled block tables, and
    q as a strided view (rows of a fused QKV output)."""
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
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), H + 2 * Hkv, D, generator=g)[:, :H]
    return q, k_cache, v_cache, tables, table


@pytest.mark.parametrize("H,Hkv,D,bs", [(6, 2, 64, 16), (4, 4, 32, 16), (8, 1, 80, 8), (2, 2, 64, 1)])
def test_matches_naive_loop(H, Hkv, D, bs):
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs)
    assert not q.is_contiguous()
    out = K.paged_decode_attention(q, kc, vc, table, torch.tensor(LENS), bs, D ** -0.5)
    ref = K.paged_decode_ref(q, kc, vc, tables, LENS, bs, D ** -0.5)
    assert out.shape == (len(LENS), H, D) and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-5)


def test_matches_gather_sdpa_path():
    """The same step through packserve's torch paged path (one group, additive mask)."""
    H, Hkv, D, bs = 6, 2, 64, 16
    q, kc, vc, tables, table = setup(LENS, H, Hkv, D, bs, seed=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # the gather path reads whole blocks (masked afterwards)
    B, nb = len(LENS), table.shape[1]
    valid = torch.arange(nb * bs)[None, :] < torch.tensor(LENS)[:, None]
    mask = torch.zeros(B, 1, 1, nb * bs).masked_fill_(~valid.view(B, 1, 1, -1), float("-inf"))
    group = PagedGroup(None, torch.arange(B), table, mask, B, 1)
    want = paged_attention(q, kc, vc, PagedMeta(B, [group]), D ** -0.5)
    got = paged_attention(q, kc, vc, PagedMeta(B, [], table, torch.tensor(LENS), bs), D ** -0.5)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_rejects_bad_input():
    q, kc, vc, _, table = setup([5, 9], 4, 2, 16, 4)
    lens = torch.tensor([5, 9])
    with pytest.raises(TypeError, match="fp32"):
        K.paged_decode_attention(q.half(), kc, vc, table, lens, 4, 0.25)
    with pytest.raises(ValueError, match="at least one"):
        K.paged_decode_attention(q, kc, vc, table, torch.tensor([0, 9]), 4, 0.25)
    with pytest.raises(ValueError, match="longer than its block table"):
        K.paged_decode_attention(q, kc, vc, table, torch.tensor([5, 13]), 4, 0.25)
    with pytest.raises(ValueError, match="shape"):
        K.paged_decode_attention(q[:, :3], kc, vc, table, lens, 4, 0.25)
    assert K.paged_decode_attention(q[:0], kc, vc, table[:0], lens[:0], 4, 0.25).shape == (0, 4, 16)
