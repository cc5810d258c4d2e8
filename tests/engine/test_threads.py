"""The engine's thread tuner, driven with step times of a known machine (no model, no timing of this machine)."""

from packserve.engine.threads import ThreadTuner


class Machine:
    """Step time per thread count, as measured on 2 cores (benchmarks/cpu_paths.py, batch 1)."""

    def __init__(self, times: dict[int, float]):
        self.times, self.threads, self.calls = times, max(times), []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.calls.append(n)


def drive(tuner: ThreadTuner, m: Machine, steps: int, batch=lambda i: 1) -> None:
    for i in range(steps):
        tuner.observe(batch(i), m.times[m.threads])


def test_quiet_machine_keeps_all_threads_after_each_trial():
    m = Machine({2: 0.0044, 1: 0.0062})
    t = ThreadTuner(2, m.set_threads, period=32, trial=4)
    drive(t, m, 400)
    assert t.current == 2 and m.threads == 2 and t.switches == 0
    assert m.calls.count(1) >= 8  # it did try, about every 32 + 4 steps


def test_a_busy_core_moves_to_half_the_threads_and_back_when_it_is_quiet_again():
    m = Machine({2: 0.043, 1: 0.0094})  # a busy loop on one of the two cores
    t = ThreadTuner(2, m.set_threads, period=32, trial=4)
    drive(t, m, 40)
    assert t.current == 1 and m.threads == 1 and t.switches == 1
    m.times = {2: 0.0044, 1: 0.0062}  # the neighbour is gone: the next trial of 2 threads wins
    drive(t, m, 40)
    assert t.current == 2 and m.threads == 2 and t.switches == 2


def test_a_trial_across_a_batch_change_is_abandoned():
    m = Machine({2: 0.043, 1: 0.0094})
    t = ThreadTuner(2, m.set_threads, period=32, trial=4)
    drive(t, m, 34, batch=lambda i: 1 if i < 33 else 2)  # the trial starts at step 32, the batch grows at 33
    assert t.current == 2 and m.threads == 2 and t.switches == 0


def test_a_trial_never_reaches_a_step_it_does_not_cover():
    """A trial at half the threads starts after a decode step; whatever comes next that is not a decode step of
    the same batch (a prefill; another batch) runs at the kept count, and the trial is over."""
    m = Machine({2: 0.0044, 1: 0.0062})
    t = ThreadTuner(2, m.set_threads, period=32, trial=4)
    drive(t, m, 32)
    assert m.threads == 1  # the trial began
    t.before_step(pure_decode=False, batch=5)  # a prefill step (the generation ended mid-trial)
    assert m.threads == 2 and t.current == 2 and t.switches == 0
    drive(t, m, 32)
    assert m.threads == 1
    t.before_step(pure_decode=True, batch=1)  # a decode step of the trial's batch: the trial goes on
    assert m.threads == 1
    t.before_step(pure_decode=True, batch=3)  # another batch
    assert m.threads == 2 and t.current == 2


def test_one_thread_has_nothing_to_tune():
    m = Machine({1: 0.01})
    t = ThreadTuner(1, m.set_threads, period=4, trial=2)
    drive(t, m, 50)
    assert not t.active and m.calls == []
