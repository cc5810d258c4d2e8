"""Grammar compiles for the HTTP server: off the event loop, bounded in number and in how long a request waits.

A structured-output or tool-calling request's grammar is compiled before the request is queued (the engine loop
then finds it in the compiled-grammar cache). Each compile runs in a child process killed past its own timeout
(packserve.engine.grammar_process: the worker here then gets a 400 for its requests), and here:
- a grammar already compiled is used at once: no queue, no thread (a queue full of slow specs never delays it);
- `slots` daemon worker threads compile, one spec at a time each (a compile still running never holds up the
  process's exit, as anyio's worker threads would); concurrent requests with the same spec share one compile;
- at most `max_queued` distinct specs wait for a worker (abandoned ones do not count): beyond that a request gets
  503 with Retry-After at once;
- a request waits at most `timeout` seconds: 503 if its compile never got a worker, 400 `grammar_too_complex` if
  it was running all that time (only when the compile itself has no shorter timeout); a queued compile that
  nobody waits for any more is dropped when its turn comes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from typing import Callable

from packserve.api.errors import APIError
from packserve.engine.request import GuidedSpec, ParameterError


class GrammarCompiles:
    def __init__(self, compile_fn: Callable[[GuidedSpec], object], is_compiled: Callable[[GuidedSpec], bool],
                 slots: int = 2, max_queued: int = 16, timeout: float = 30.0):
        self.compile_fn, self.is_compiled = compile_fn, is_compiled
        self.slots, self.max_queued, self.timeout = slots, max_queued, timeout
        # spec -> (future, waiting requests) of its latest compile; the queue: (spec, future) in arrival order
        self._jobs: dict[GuidedSpec, tuple[concurrent.futures.Future, list[int]]] = {}
        self._queue: collections.deque[tuple[GuidedSpec, concurrent.futures.Future]] = collections.deque()
        self._cond = threading.Condition()
        self._workers = 0

    async def compile(self, spec: GuidedSpec) -> None:
        """Raises APIError: 400 when the spec does not compile (or keeps compiling past the timeout), 503 when
        the compile workers are busy."""
        if self.is_compiled(spec):
            return
        with self._cond:
            job = self._jobs.get(spec)
            if job is None or job[0].cancelled():
                if len(self._queue) >= self.max_queued:  # abandoned ones first make room
                    self._queue = collections.deque(e for e in self._queue if not e[1].cancelled())
                    if len(self._queue) >= self.max_queued:
                        raise _busy(spec)
                job = (concurrent.futures.Future(), [0])
                self._jobs[spec] = job
                self._queue.append((spec, job[0]))
                if self._workers < self.slots:
                    self._workers += 1
                    threading.Thread(target=self._work, daemon=True, name="grammar-compile").start()
                self._cond.notify()
            future, waiters = job
            waiters[0] += 1
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout)
        except asyncio.TimeoutError:
            if not future.running():
                raise _busy(spec) from None
            raise APIError(400, f"the {spec.kind.replace('_', ' ')} did not compile within {self.timeout:.0f} s; "
                                "simplify it", spec.param, "grammar_too_complex") from None
        except ParameterError as e:
            raise APIError(400, e.message, e.param, e.code or "invalid_value") from None
        except ImportError:
            raise APIError(400, "structured outputs need the xgrammar package on the server", spec.param,
                           "unsupported_parameter") from None
        finally:
            with self._cond:
                waiters[0] -= 1
                if waiters[0] == 0:
                    future.cancel()  # nobody waits: if it has not started, it never will

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                spec, future = self._queue.popleft()
                if not future.set_running_or_notify_cancel():  # abandoned while queued
                    if self._jobs.get(spec, (None,))[0] is future:
                        del self._jobs[spec]
                    continue
            try:
                future.set_result(self.compile_fn(spec))
            except BaseException as e:  # delivered to the waiting requests
                future.set_exception(e)
            finally:
                with self._cond:
                    if self._jobs.get(spec, (None,))[0] is future:
                        del self._jobs[spec]


def _busy(spec: GuidedSpec) -> APIError:
    return APIError(503, "the structured-output compiler is busy; retry later", spec.param, "grammar_compiler_busy",
                    headers={"Retry-After": "2"})
