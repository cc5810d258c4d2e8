"""Arrival processes: when each request is sent.

- rate = inf: all at once (every inter-arrival gap is 0); with `max_concurrency` C this becomes a closed
  loop of C requests always in flight ("fixed concurrency").
- Poisson at `rate` (burstiness 1): exponential gaps, mean 1/rate, variance 1/rate^2.
- gamma with burstiness b (vLLM's convention): shape = b, scale = 1/(rate*b), so the mean stays 1/rate
  and the variance is 1/(rate^2 * b); b < 1 is burstier than Poisson, b > 1 smoother.

Request 0 goes at t = 0; request i goes at the sum of the first i gaps (as vLLM sends, then sleeps).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrivalConfig:
    rate: float = math.inf  # requests per second; inf = all at once
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"request rate must be > 0 (or inf), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness}")

    @property
    def kind(self) -> str:
        if math.isinf(self.rate):
            return "all-at-once"
        return "poisson" if self.burstiness == 1.0 else "gamma"


def intervals(cfg: ArrivalConfig, n: int, seed: int = 0) -> np.ndarray:
    """`n` inter-arrival gaps in seconds."""
    if math.isinf(cfg.rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=cfg.burstiness, scale=1.0 / (cfg.rate * cfg.burstiness), size=n)


def interval_stream(cfg: ArrivalConfig, seed: int = 0, block: int = 1024) -> Iterator[float]:
    """Endless gaps, same values as `intervals` drawn in blocks (duration-bounded runs need no count)."""
    rng = np.random.default_rng(seed)
    while True:
        if math.isinf(cfg.rate):
            yield 0.0
            continue
        yield from rng.gamma(shape=cfg.burstiness, scale=1.0 / (cfg.rate * cfg.burstiness), size=block).tolist()


def send_offsets(cfg: ArrivalConfig, n: int, seed: int = 0) -> np.ndarray:
    """Scheduled send times (seconds from the start) of requests 0..n-1."""
    gaps = intervals(cfg, max(n - 1, 0), seed)
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]
