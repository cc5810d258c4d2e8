"""Arrival processes: Poisson and gamma inter-arrival statistics and schedule bookkeeping."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from packserve.loadtest.arrivals import ArrivalConfig, interval_stream, intervals, send_offsets

N = 40_000


def _bounds(rate: float, shape: float, n: int) -> tuple[float, float]:
    """Standard errors of the sample mean and sample variance of n gamma(shape, 1/(rate*shape)) gaps."""
    scale = 1.0 / (rate * shape)
    var = shape * scale**2
    mu4 = 3 * shape * (shape + 2) * scale**4  # fourth central moment of a gamma distribution
    return math.sqrt(var / n), math.sqrt((mu4 - var**2) / n)


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_mean_and_variance(rate):
    gaps = intervals(ArrivalConfig(rate, 1.0), N, seed=0)
    se_mean, se_var = _bounds(rate, 1.0, N)
    assert abs(gaps.mean() - 1 / rate) < 4 * se_mean
    assert abs(gaps.var(ddof=1) - 1 / rate**2) < 4 * se_var
    assert (gaps > 0).all()


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 8.0])
def test_gamma_burstiness_scales_variance(burstiness):
    rate = 4.0
    gaps = intervals(ArrivalConfig(rate, burstiness), N, seed=1)
    se_mean, se_var = _bounds(rate, burstiness, N)
    assert abs(gaps.mean() - 1 / rate) < 4 * se_mean  # mean rate unchanged
    assert abs(gaps.var(ddof=1) - 1 / (rate**2 * burstiness)) < 4 * se_var


def test_burstier_means_larger_variance():
    v = [intervals(ArrivalConfig(10.0, b), N, seed=2).var() for b in (0.25, 1.0, 4.0)]
    assert v[0] > 2 * v[1] > 4 * v[2]


def test_infinite_rate_is_all_at_once():
    cfg = ArrivalConfig(math.inf)
    assert cfg.kind == "all-at-once"
    assert not intervals(cfg, 10).any()
    assert list(itertools.islice(interval_stream(cfg), 5)) == [0.0] * 5


def test_seeded_and_stream_matches_batch():
    cfg = ArrivalConfig(3.0, 0.7)
    assert cfg.kind == "gamma" and ArrivalConfig(3.0).kind == "poisson"
    a, b = intervals(cfg, 3000, seed=7), intervals(cfg, 3000, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, intervals(cfg, 3000, seed=8))
    # The endless stream used by duration-bounded runs draws the very same gaps.
    np.testing.assert_allclose(list(itertools.islice(interval_stream(cfg, seed=7, block=512), 3000)), a)
    offs = send_offsets(cfg, 6, seed=7)
    assert offs[0] == 0.0
    np.testing.assert_allclose(offs[1:], np.cumsum(a[:5]))


@pytest.mark.parametrize("rate,burst", [(0, 1.0), (-1, 1.0), (1.0, 0.0), (1.0, math.inf)])
def test_rejects_bad_config(rate, burst):
    with pytest.raises(ValueError):
        ArrivalConfig(rate, burst)
