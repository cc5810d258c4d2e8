"""Grammar compiles for the HTTP server: off the event loop, bounded in number and in how long a request waits.

A structured-output or tool-calling request's grammar is compiled before the request is queued (the engine loop
then finds it in the compiled-grammar cache). xgrammar's compile cannot be interrupted and some specs within the
limits still take seconds, so here:
- at most `slots` compiles run at once, each in a daemon thread (a compile still running never holds up the
  process's exit; anyio's worker threads would);
- concurrent requests with the same spec wait for one compile;
- at most `max_queued` distinct specs wait for a slot: beyond that a request gets 503 at once (Retry-After);
- a request waits at most `timeout` seconds: then 400 (its compile goes on and is cached when it finishes, unless
  nobody waits for it any more and it has not started, in which case it never starts).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Callable

from packserve.api.errors import APIError
from packserve.engine.request import GuidedSpec, ParameterError


class GrammarCompiles:
    def __init__(self, compile_fn: Callable[[GuidedSpec], object], slots: int = 2, max_queued: int = 16,
                 timeout: float = 30.0):
        self.compile_fn = compile_fn
        self.slots = threading.Semaphore(slots)
        self.max_pending = slots + max_queued
        self.timeout = timeout
        self._pending: dict[GuidedSpec, tuple[concurrent.futures.Future, list[int]]] = {}  # spec -> (future, waiters)
        self._threads = 0  # compile threads alive (running, or waiting for a slot: cancelled ones too)
        self._lock = threading.Lock()

    async def compile(self, spec: GuidedSpec) -> None:
        """Raises APIError: 400 when the spec does not compile (or not within the timeout), 503 when too many
        distinct specs are already waiting."""
        with self._lock:
            entry = self._pending.get(spec)
            if entry is None or entry[0].cancelled():
                if self._threads >= self.max_pending:
                    raise APIError(503, "too many structured-output grammars are compiling; retry later",
                                   spec.param, "grammar_compiler_busy", headers={"Retry-After": "2"})
                entry = (concurrent.futures.Future(), [0])
                self._pending[spec] = entry
                self._threads += 1
                threading.Thread(target=self._run, args=(spec, entry[0]), daemon=True,
                                 name="grammar-compile").start()
            future, waiters = entry
            waiters[0] += 1
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout)
        except asyncio.TimeoutError:
            raise APIError(400, f"the {spec.kind.replace('_', ' ')} did not compile within {self.timeout:.0f} s; "
                                "simplify it", spec.param, "grammar_too_complex") from None
        except ParameterError as e:
            raise APIError(400, e.message, e.param, "invalid_value") from None
        except ImportError:
            raise APIError(400, "structured outputs need the xgrammar package on the server", spec.param,
                           "unsupported_parameter") from None
        finally:
            with self._lock:
                waiters[0] -= 1
                if waiters[0] == 0:
                    future.cancel()  # nobody waits: if it has not started, it never will

    def _run(self, spec: GuidedSpec, future: concurrent.futures.Future) -> None:
        try:
            with self.slots:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(self.compile_fn(spec))
                    except BaseException as e:  # delivered to the waiting requests
                        future.set_exception(e)
        finally:
            with self._lock:
                self._threads -= 1
                entry = self._pending.get(spec)
                if entry is not None and entry[0] is future:
                    del self._pending[spec]
