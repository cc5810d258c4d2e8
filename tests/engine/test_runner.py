from hypothesis import given, settings
from hypothesis import strategies as st

from packserve.engine.runner import length_groups


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 2000), min_size=1, max_size=64), st.integers(1, 6))
def test_length_groups_partition(lengths, max_groups):
    groups = length_groups(lengths, max_groups=max_groups)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert 1 <= len(groups) <= max_groups
    # Groups are contiguous runs of the sorted lengths, and splitting never adds padded slots.
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded <= len(lengths) * max(lengths)


def test_length_groups_splits_a_bimodal_batch():
    lengths = [10] * 20 + [1000] * 2
    groups = length_groups(lengths)
    assert len(groups) >= 2
    assert sorted(groups[-1]) == [20, 21]
    assert length_groups([100, 101, 102]) == [[0, 1, 2]]  # nothing worth splitting
