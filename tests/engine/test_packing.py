import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packserve.engine.packing import (best_fit_decreasing, build_packed_batch, first_fit_decreasing, pack)
from packserve.layers.attention import block_diagonal_causal_mask


def optimal_bins(lengths, capacity):
    """Brute force: the fewest bins (tiny instances only)."""
    n = len(lengths)
    for k in range(1, n + 1):
        for assign in itertools.product(range(k), repeat=n):
            if len(set(assign)) != k:
                continue
            loads = [0] * k
            for i, b in enumerate(assign):
                loads[b] += lengths[i]
            if max(loads) <= capacity:
                return k
    return n


instances = st.integers(min_value=1, max_value=20).flatmap(
    lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), min_size=1, max_size=7)))


@settings(max_examples=150, deadline=None)
@given(instances)
def test_ffd_bfd_are_valid_and_near_optimal(inst):
    capacity, lengths = inst
    opt = optimal_bins(lengths, capacity)
    for algo in (first_fit_decreasing, best_fit_decreasing):
        bins = algo(lengths, capacity)
        placed = sorted(i for b in bins for i in b)
        assert placed == list(range(len(lengths))), "each prompt placed exactly once"
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins), "no row over capacity"
        assert len(bins) <= 11 / 9 * opt + 6 / 9 + 1e-9


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.sampled_from(["ffd", "bfd"]),
       st.one_of(st.none(), st.integers(1, 600)))
def test_packed_batch_layout(lengths, algo, capacity):
    tokens = [[1000 * i + j for j in range(n)] for i, n in enumerate(lengths)]
    slots = [[7 * (1000 * i + j) for j in range(n)] for i, n in enumerate(lengths)]
    b = build_packed_batch(tokens, slots, capacity=capacity, algorithm=algo)
    lay = b.layout
    assert lay.capacity >= max(lengths)
    assert all(sum(lay.lengths[i] for i in row) <= lay.capacity for row in lay.rows)
    assert sorted(lay.order) == list(range(len(lengths)))
    assert b.cu_seqlens[-1] == sum(lengths) == len(b.token_ids) == len(b.position_ids) == len(b.slot_mapping)
    for k, i in enumerate(lay.order):
        s, e = b.cu_seqlens[k], b.cu_seqlens[k + 1]
        assert b.token_ids[s:e] == tokens[i]
        assert b.position_ids[s:e] == list(range(lengths[i])), "positions restart at every prompt"
        assert b.slot_mapping[s:e] == slots[i]
        assert b.last_token_index[i] == e - 1
    # Rows are contiguous runs of the flat tokens, segments numbered within each row.
    for r, row in enumerate(lay.rows):
        s, e = b.row_cu_tokens[r], b.row_cu_tokens[r + 1]
        segs = b.segment_ids[s:e]
        assert segs == [k for k, i in enumerate(row) for _ in range(lengths[i])]
    assert 0 < lay.efficiency <= 1
    assert lay.padding_avoided == max(lengths) * len(lengths) - sum(lengths)


def test_ffd_example_and_efficiency():
    lay = pack([5, 3, 3, 2, 2, 1], capacity=None)
    # FFD: [5] [3 2] [3 2] [1] -> 16 real tokens in 4 rows of 5
    assert lay.capacity == 5 and lay.rows == ((0,), (1, 3), (2, 4), (5,))
    assert lay.efficiency == pytest.approx(16 / 20)
    assert lay.padding_avoided == 5 * 6 - 16
    # BFD puts the 1 into the fullest row that fits it
    assert best_fit_decreasing([5, 4, 3, 1], 5) == [[0], [1, 3], [2]]
    lay = pack([4, 4, 2, 2, 2, 1, 1], capacity=None)
    assert lay.num_rows == 4 and lay.efficiency == pytest.approx(16 / 16)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        first_fit_decreasing([3, 0], 5)
    with pytest.raises(ValueError):
        first_fit_decreasing([6], 5)
    with pytest.raises(ValueError):
        pack([1, 2], algorithm="nope")


def test_block_diagonal_causal_mask():
    lens = [3, 1, 2]
    m = block_diagonal_causal_mask(lens, capacity=8)
    seg = [0, 0, 0, 1, 2, 2]
    for q in range(6):
        for k in range(8):
            expected = k < 6 and seg[q] == seg[k] and k <= q
            assert bool(m[q, k]) == expected
    # padding attends only to itself: never an all-masked row
    assert m.any(dim=-1).all()
    assert m[6].tolist() == [False] * 6 + [True, False]


def test_mask_matches_xformers_when_installed():
    torch = pytest.importorskip("torch")
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias")
    lens = [5, 1, 7, 3]
    ours = block_diagonal_causal_mask(lens)
    theirs = attn_bias.BlockDiagonalCausalMask.from_seqlens(lens).materialize((sum(lens), sum(lens)))
    assert torch.equal(ours, theirs == 0)


def test_random_large_instance_efficiency():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(200)]
    lay = pack(lengths)
    assert lay.efficiency > 0.9
