"""The engine thread's torch thread count, chosen by measuring decode steps (CPU only).

A step runs ~100 OpenMP parallel regions, each waiting for its slowest thread. When another process shares one of
the cores (a noisy neighbour, a CPU quota smaller than the cores), the thread on that core is descheduled for a
whole timeslice now and then, and every region waits for it: on 2 cores with a busy loop on one, a decode step
took 43 ms at 2 threads and 9.4 ms at 1 (4.4 ms at 2 threads on a quiet machine; benchmarks/cpu_paths.py
--busy-core). No static setting is right for both, so the tuner tries the other count now and then.

Every `period` decode steps it runs `trial` steps at the other candidate (the full count or half of it) and keeps
whichever was faster per step for the same batch: a trial is only compared with the last steps at the same
number of running requests, and abandoned if the batch changes or a step of another kind (a prefill) comes first:
`before_step` restores the kept count before any step the trial does not cover, so a trial's thread count never
leaks into prefill steps (it did: after a generation ended mid-trial, every prefill-only request that followed ran
on half the threads, ~1.9x slower, until the next decode batch). Cost on a quiet machine: `trial` slower steps
per `period` (~1-2%).
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Callable


class ThreadTuner:
    def __init__(self, max_threads: int, set_threads: Callable[[int], None], period: int = 256, trial: int = 8,
                 margin: float = 0.9):
        self.candidates = (max_threads, max(1, max_threads // 2))
        self.current = max_threads
        self.set_threads = set_threads
        self.period, self.trial, self.margin = period, trial, margin
        self._recent: deque[tuple[int, float]] = deque(maxlen=trial)  # (batch, seconds) at the current count
        self._trial: list[float] | None = None
        self._trial_batch = 0
        self._steps = 0
        self.switches = 0

    @property
    def active(self) -> bool:
        return self.candidates[0] != self.candidates[1]

    def before_step(self, pure_decode: bool, batch: int) -> None:
        """Called before every step: a step the running trial does not cover (not a pure decode step of the
        trial's batch) ends the trial first, at the kept thread count."""
        if self._trial is not None and (not pure_decode or batch != self._trial_batch):
            self._end_trial(keep=False)

    def observe(self, batch: int, seconds: float) -> None:
        """One pure decode step of `batch` requests took `seconds` at the thread count in force."""
        if not self.active:
            return
        if self._trial is not None:
            if batch != self._trial_batch:  # the batch changed: no fair comparison
                self._end_trial(keep=False)
                return
            self._trial.append(seconds)
            if len(self._trial) >= self.trial:
                base = [s for b, s in self._recent if b == batch]
                keep = len(base) >= self.trial // 2 and statistics.median(self._trial) < self.margin * statistics.median(base)
                self._end_trial(keep)
            return
        self._recent.append((batch, seconds))
        self._steps += 1
        if self._steps >= self.period and sum(b == batch for b, _ in self._recent) == len(self._recent):
            self._trial, self._trial_batch = [], batch
            self.set_threads(self._other())

    def _other(self) -> int:
        return self.candidates[1] if self.current == self.candidates[0] else self.candidates[0]

    def _end_trial(self, keep: bool) -> None:
        if keep:
            self.current = self._other()
            self.switches += 1
            self._recent.clear()
        self.set_threads(self.current)
        self._trial, self._steps = None, 0
