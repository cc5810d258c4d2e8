"""AsyncEngine: the LLMEngine driven by one background thread, fed from asyncio.

The engine is not thread-safe, so exactly one thread (the loop thread) touches
it. Coroutines hand work to that thread through a thread-safe command queue
(`submit`, `abort`), applied between steps; the thread pushes each step's
outputs to the per-submission asyncio queues with `loop.call_soon_threadsafe`
(one call per step and event loop). When there is nothing to do it sleeps on
an Event, so an idle server burns no CPU.

A submission groups the engine requests of one HTTP request (n > 1 or a batch
of prompts): all are queued or none (QueueFull / ParameterError are raised in
the caller's coroutine), and its stream yields their outputs interleaved until
every one has finished. If a step raises, the thread fails every open stream
with EngineDeadError and stops; `alive` turns False (the server answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from packserve.engine.engine import LLMEngine
from packserve.engine.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an internal error; no request can complete."""


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float | None = None
    group: str | None = None  # requests of one prompt sampled n times: the prompt is computed once


class _Outputs:
    """A submission's undelivered outputs, the newest per request only: outputs are cumulative (all text and
    tokens so far), so a newer one replaces an older one not yet taken. A consumer that stops reading (a stalled
    stream) thus holds one output per request, not one per step, each a copy of everything so far. An
    exception (the engine failed) is raised after the outputs already there. Event-loop thread only."""

    def __init__(self):
        self._latest: dict[str, RequestOutput] = {}  # in first-arrival order
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = self._error or item
        else:
            self._latest[item.request_id] = item
        self._ready.set()

    def get_nowait(self) -> RequestOutput | BaseException | None:
        if self._latest:
            rid = next(iter(self._latest))
            return self._latest.pop(rid)
        if self._error is not None:
            return self._error
        self._ready.clear()
        return None

    async def get(self) -> RequestOutput | BaseException:
        while (item := self.get_nowait()) is None:
            await self._ready.wait()
        return item


@dataclass
class _Submission:
    requests: list[EngineRequest]
    loop: asyncio.AbstractEventLoop
    queue: _Outputs
    accepted: asyncio.Future
    final_only: bool = False  # a non-streamed response: skip the per-token outputs


class RequestStream:
    """Async iterator over the outputs of one submission; ends when all its requests finished."""

    def __init__(self, engine: "AsyncEngine", sub: _Submission):
        self._engine = engine
        self._sub = sub
        self.request_ids = [r.request_id for r in sub.requests]
        self._open = set(self.request_ids)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._open:
            raise StopAsyncIteration
        return self._take(await self._sub.queue.get())

    def _take(self, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            self._open.clear()
            raise item
        if item.finished:
            self._open.discard(item.request_id)
        return item

    def get_nowait(self) -> RequestOutput | None:
        """An output already delivered, or None (lets a slow consumer coalesce cumulative outputs)."""
        if not self._open:
            return None
        item = self._sub.queue.get_nowait()
        return None if item is None else self._take(item)

    def abort(self) -> None:
        """Abort every unfinished request of this submission (idempotent, non-blocking)."""
        if self._open:
            self._engine.abort(list(self._open))


StepHook = Callable[[LLMEngine, list[RequestOutput], float], None]

GATHER_GAP = 0.002  # seconds without a new arrival that end the batch window


class AsyncEngine:
    """`engine`: a built LLMEngine, or `factory` builds it inside the loop thread (the server's way).

    Why build it there: libgomp gives every thread that runs a parallel region its own worker pool, and once
    two pools exist on a machine with no spare cores, every worker falls back to a short spin before it
    sleeps, so each of a decode step's ~700 small ops pays a futex wake-up. On the 2-core benchmark machine
    that made a step ~40% slower when the weights were loaded on the main thread and the steps ran here. With
    a factory, the loop thread is the only one that runs torch work, with `num_threads` threads; the caller
    keeps its own thread at one torch thread (see packserve.commands.serve)."""

    def __init__(self, engine: LLMEngine | None = None, on_step: StepHook | None = None,
                 on_idle: StepHook | None = None, *, factory: Callable[[], LLMEngine] | None = None,
                 num_threads: int | None = None, batch_window: float = 0.0):
        if (engine is None) == (factory is None):
            raise ValueError("pass exactly one of engine and factory")
        self.engine = engine
        self._factory = factory
        self._num_threads = num_threads
        # On an idle engine, the first arrival waits until arrivals pause (GATHER_GAP) or `batch_window`
        # seconds pass, so a burst of requests is packed into one prefill step instead of the first request
        # running alone while the rest queue behind it. 0 disables it.
        self.batch_window = batch_window
        self._built = threading.Event()
        self.on_step = on_step  # called in the loop thread after each step (metrics)
        self.on_idle = on_idle  # called in the loop thread after commands were applied with nothing to run
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._subs: dict[str, _Submission] = {}  # request id -> its submission (loop thread only)
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="packserve-engine", daemon=True)
        self._started = False

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread; with a factory, wait until it built the engine (its exception is re-raised)."""
        if not self._started:
            self._started = True
            self._thread.start()
            self._built.wait()
            if self.engine is None:
                self._thread.join()
                raise self.error

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._started:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The loop runs and, with tensor parallelism, every worker process too."""
        tp = getattr(self.engine, "tp", None)
        return (self._started and self._thread.is_alive() and self.error is None and not self._stopping
                and (tp is None or tp.alive()))

    # -- API (event-loop side) ----------------------------------------------
    async def submit(self, requests: Sequence[EngineRequest], final_only: bool = False) -> RequestStream:
        """Queue all requests (or none); raises ParameterError / QueueFull / EngineDeadError.
        final_only: the stream yields only each request's finished output."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        sub = _Submission(list(requests), loop, _Outputs(), loop.create_future(), final_only)
        self._put(("submit", sub))
        try:
            await sub.accepted
        except asyncio.CancelledError:
            # The caller went away before the loop answered: abort whatever got queued.
            self.abort([r.request_id for r in sub.requests])
            raise
        return RequestStream(self, sub)

    def abort(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            self._put(("abort", list(request_ids)))

    def abort_all(self) -> None:
        self._put(("abort_all", None))

    def _put(self, cmd: tuple[str, Any]) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # -- the loop thread ----------------------------------------------------
    def _run(self) -> None:
        try:
            if self._num_threads:
                import torch

                torch.set_num_threads(self._num_threads)
            try:
                if self.engine is None:
                    self.engine = self._factory()
            except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
                self.error = exc
                return
            finally:
                self._built.set()
            while not self._stopping:
                self._wake.clear()
                was_idle = not self.engine.has_unfinished()
                applied = self._apply_commands()
                if was_idle and applied and self.batch_window > 0 and self.engine.has_unfinished():
                    self._gather(time.monotonic() + self.batch_window)
                if not self.engine.has_unfinished():
                    if applied and self.on_idle is not None:
                        self.on_idle(self.engine, [], time.monotonic())
                    self._wake.wait()
                    continue
                outputs = self.engine.step()
                now = time.monotonic()
                self._deliver(outputs)
                if self.on_step is not None:
                    self.on_step(self.engine, outputs, now)
        except BaseException as exc:  # noqa: BLE001 - the loop must report any failure, then stop
            log.exception("engine loop died")
            self.error = exc
            self._fail_all(EngineDeadError("the engine stopped after an internal error"))
        finally:
            self._stopping = True
            self._fail_all(EngineDeadError("the engine is shutting down"))
            if self.engine is not None:
                self.engine.shutdown()  # tensor-parallel workers stop with the loop that drives them

    def _gather(self, deadline: float) -> None:
        """Keep applying arrivals until none came for GATHER_GAP seconds or the deadline passed."""
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            if not self._apply_commands() and not self._wake.wait(min(GATHER_GAP, left)):
                return

    def _apply_commands(self) -> bool:
        applied = False
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            if kind == "submit":
                self._add(arg)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "abort_all":
                self._abort(list(self._subs))

    def _add(self, sub: _Submission) -> None:
        added: list[str] = []
        try:
            for r in sub.requests:
                self.engine.add_request(r.prompt if r.prompt is not None else r.prompt_token_ids, r.params,
                                        request_id=r.request_id, arrival_time=r.arrival_time,
                                        prompt_token_ids=r.prompt_token_ids, group=r.group)
                added.append(r.request_id)
        except Exception as exc:  # ParameterError / QueueFull: undo the partial submission
            for rid in added:
                self.engine.abort_request(rid)
            _resolve(sub, exc)
            return
        for rid in added:
            self._subs[rid] = sub
        _resolve(sub, None)

    def _abort(self, request_ids: list[str]) -> None:
        outs = []
        for rid in request_ids:
            if rid not in self._subs:
                continue
            out = self.engine.abort_request(rid)
            if out is not None:
                outs.append(out)
            else:  # already finished inside the engine: close the stream anyway
                self._subs.pop(rid, None)
        self._deliver(outs)
        if outs and self.on_step is not None:
            self.on_step(self.engine, outs, time.monotonic())

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            sub = self._subs.get(out.request_id)
            if sub is None:
                continue
            if out.finished:
                del self._subs[out.request_id]
            elif sub.final_only:
                continue
            batches.setdefault(sub.loop, []).append((sub.queue, out))
        for loop, items in batches.items():
            _call_soon(loop, _put_all, items)

    def _fail_all(self, exc: BaseException) -> None:
        subs = {id(s): s for s in self._subs.values()}
        self._subs.clear()
        for sub in subs.values():
            _call_soon(sub.loop, sub.queue.put_nowait, exc)
        # Submissions still in the command queue: answer them too.
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                _resolve(arg, exc)


def _put_all(items) -> None:
    for q, out in items:
        q.put_nowait(out)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass


def _resolve(sub: _Submission, exc: BaseException | None) -> None:
    def done():
        if sub.accepted.done():
            return
        if exc is None:
            sub.accepted.set_result(None)
        else:
            sub.accepted.set_exception(exc)

    _call_soon(sub.loop, done)
