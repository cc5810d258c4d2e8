"""The HTTP server around the app: uvicorn (h11) with the defences a public endpoint needs.

- The port is bound before the model loads, so a second server on a used port fails at once (one line, exit 2).
- The soft open-file limit is raised to the hard limit: each connection is a file descriptor.
- Idle connections cannot lock others out. A connection must deliver a request's headers within READ_TIMEOUT
  of starting to wait for one (on connect and after each keep-alive response): uvicorn's keep-alive timer is
  cancelled by any byte received, so `POST / HTTP/1.1\\r\\nHost: x\\r\\n` followed by silence held a socket
  forever. Connections waiting for headers are also capped (MAX_IDLE_CONNECTIONS, at most half the open-file
  limit): beyond the cap the longest-waiting one is closed, so a new connection (a /health probe) is always
  accepted and answered. Request bodies must keep arriving too (middleware.BodyLimitMiddleware, same timeout).
- accept() errors (EMFILE) are logged once per 10 s with a count, not as a traceback per attempt.
- The first SIGTERM/SIGINT drains (new requests 503, in-flight ones finish within the shutdown timeout); a second
  one aborts what is in flight (streams still end with a final chunk and [DONE]) and exits within a second.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import socket
import struct
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (raises OSError, e.g. the port is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def raise_open_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


CLOSE_LINGER = 10.0  # seconds a closed connection may keep unsent data for its client to read


def guarded_protocol(read_timeout: float, max_idle: int) -> type[H11Protocol]:
    """An h11 protocol class whose connections get the header deadline and the idle cap (module docstring)."""
    idle: collections.OrderedDict[H11Protocol, None] = collections.OrderedDict()  # awaiting headers, oldest first

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._await_request()
            # A close with unsent data waits for the client to read it, forever for one that never does (a dropped
            # stream, a timed-out response): such a close becomes a reset after CLOSE_LINGER seconds.
            close = transport.close

            def reset() -> None:
                if transport.is_closing() and transport.get_extra_info("socket") is not None:
                    try:  # RST: the kernel drops what it still holds too, instead of retrying it for minutes
                        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                      struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                    transport.abort()

            def close_then_reset() -> None:
                close()
                if transport.get_write_buffer_size():
                    self.loop.call_later(CLOSE_LINGER, reset)
            transport.close = close_then_reset

        def _await_request(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(read_timeout, self._close_idle)
            idle[self] = None
            while len(idle) > max_idle:
                oldest, _ = idle.popitem(last=False)
                oldest._close_idle()

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _close_idle(self) -> None:
            self._cancel_header_timer()
            idle.pop(self, None)
            if not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived: it is being served, not idle
                self._cancel_header_timer()
                idle.pop(self, None)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
                self._await_request()  # keep-alive: the next request's headers get the same deadline

        def connection_lost(self, exc):
            self._cancel_header_timer()
            idle.pop(self, None)
            super().connection_lost(exc)

    return GuardedH11Protocol


class _RateLimitedLoopErrors:
    """asyncio's exception handler, with accept() failures (out of file descriptors) summarized every 10 s."""

    def __init__(self, every: float = 10.0):
        self.every, self.last, self.suppressed = every, 0.0, 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "accept" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last < self.every:
            self.suppressed += 1
            return
        exc = context.get("exception")
        log.error("accept() failed: %s%s", exc or context.get("message"),
                  f" ({self.suppressed} more in the last {self.every:.0f} s)" if self.suppressed else "")
        self.last, self.suppressed = now, 0


ENGINE_WATCH_SECONDS = 1.0


def run_server(app, state, sock: socket.socket, log_level: str, shutdown_timeout: float, read_timeout: float,
               max_idle_connections: int) -> int:
    limit = raise_open_file_limit()
    max_idle = max(1, min(max_idle_connections, limit // 2))
    if max_idle < max_idle_connections:
        log.warning("open-file limit %d: at most %d idle connections", limit, max_idle)

    class DrainingServer(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None
        _draining = False

        exit_code = 0

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            self._loop.set_exception_handler(_RateLimitedLoopErrors())
            watch = asyncio.ensure_future(self._watch_engine())
            try:
                await super().serve(sockets)
            finally:
                watch.cancel()

        async def _watch_engine(self):
            """A dead engine (its loop, or a tensor-parallel worker) ends the server with exit code 1 within about
            a second: /health already answers 503, and a process manager restarts a process, not a loop."""
            while not self.should_exit:
                await asyncio.sleep(ENGINE_WATCH_SECONDS)
                if self.started and not state.draining and not state.engine.alive:
                    log.error("the engine is not running (%s); exiting", state.engine.error or "a worker died")
                    self.exit_code = 1
                    state.engine.abort_all()
                    self.should_exit = True

        def handle_exit(self, sig, frame):
            if self._loop is None:
                self.should_exit = True
                return
            if self._draining:  # the second signal: stop now
                log.info("signal %d again: aborting in-flight requests and exiting", sig)
                state.engine.abort_all()
                # A moment for the aborted streams to send their last chunk and [DONE], then no more waiting.
                self._loop.call_soon_threadsafe(self._loop.call_later, 0.3, self._force_exit)
                return
            self._draining = True
            state.draining = True
            log.info("signal %d: draining (up to %.1fs), new requests get 503; a second signal exits now", sig,
                     shutdown_timeout)
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        def _force_exit(self) -> None:
            self.should_exit = True
            self.force_exit = True

        async def _drain(self):
            try:
                await state.drain(shutdown_timeout)
            finally:
                log.info("drained; shutting down")
                self.should_exit = True

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=1, lifespan="on",
                            http=guarded_protocol(read_timeout, max_idle), timeout_keep_alive=5)
    server = DrainingServer(config)
    server.run(sockets=[sock])
    return server.exit_code
