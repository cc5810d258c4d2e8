"""The asyncio dispatcher: sends requests on the arrival schedule, bounded by count, duration and Ctrl-C.

Bounds: `num_requests` stops dispatch after that many measured requests; `duration` stops dispatch after
that many seconds (in-flight requests then finish, each bounded by `timeout`); `Stopper.abort()` (the CLI
wires it to SIGINT) stops dispatch and cancels in-flight requests, which are recorded as `cancelled`.
Warm-up requests run before the clock starts and are excluded from every metric and server-metric delta.
With `max_concurrency` C the dispatcher waits for a free slot before sending, so the send time (and TTFT)
starts when the request actually goes out, as in vLLM.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from .arrivals import ArrivalConfig, interval_stream
from .client import ENDPOINT_PATHS, RequestResult, build_payload, send_request
from .metrics import parse_prometheus
from .workload import RequestSpec


@dataclass(frozen=True)
class RunConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"
    model: str | None = None  # None: the first id of GET /v1/models
    num_requests: int | None = None
    duration: float | None = None
    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)
    max_concurrency: int | None = None
    timeout: float = 300.0
    warmup: int = 0
    seed: int = 0
    ignore_eos: bool = False
    include_usage: bool = True
    api_key: str | None = None
    scrape_metrics: bool = True
    extra_body: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        if self.num_requests is None and self.duration is None:
            raise ValueError("give num_requests or duration: a run must be bounded")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if math.isinf(self.arrival.rate) and self.num_requests is None and self.max_concurrency is None:
            # A duration-only run with infinite rate and no concurrency cap would open connections without end.
            raise ValueError("request_rate=inf with only a duration bound needs max_concurrency")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {self.timeout}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    @property
    def root_url(self) -> str:
        """Server root (where /metrics and /health live) even if base_url was given with /v1."""
        url = self.base_url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url


class Stopper:
    """Two levels of stopping: `stop_dispatch` (no new requests) and `abort` (also cancel in-flight)."""

    def __init__(self) -> None:
        self.dispatch = asyncio.Event()
        self.aborted = asyncio.Event()

    def stop_dispatch(self) -> None:
        self.dispatch.set()

    def abort(self) -> None:
        self.dispatch.set()
        self.aborted.set()

    def rearm(self) -> None:
        """Allow dispatch again for the next run of a sweep, unless aborted."""
        if not self.aborted.is_set():
            self.dispatch.clear()


@dataclass
class RunOutcome:
    config: RunConfig
    model: str
    results: list[RequestResult]
    warmup_results: list[RequestResult]
    start: float  # perf_counter when the measured phase began
    duration_s: float
    started_at: float  # wall clock (time.time())
    interrupted: bool
    metrics_before: dict | None
    metrics_after: dict | None


def make_client(cfg: RunConfig) -> httpx.AsyncClient:
    # No pool limit: a pool cap would queue requests inside the client and inflate TTFT.
    # trust_env=False: load generators should not detour through proxies from the environment.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout), limits=limits, trust_env=False)


async def resolve_model(client: httpx.AsyncClient, cfg: RunConfig) -> str:
    if cfg.model:
        return cfg.model
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        resp = await client.get(cfg.root_url + "/v1/models", headers=headers, timeout=10.0)
        return resp.json()["data"][0]["id"]
    except Exception as exc:
        raise RuntimeError(f"no --model given and GET {cfg.root_url}/v1/models failed: {exc}") from None


async def scrape(client: httpx.AsyncClient, cfg: RunConfig) -> dict | None:
    """Parsed /metrics, or None when the target has none (any error: not every server exposes it)."""
    if not cfg.scrape_metrics:
        return None
    try:
        resp = await client.get(cfg.root_url + "/metrics", timeout=10.0)
        if resp.status_code != 200:
            return None
        return parse_prometheus(resp.text)
    except Exception:
        return None


async def _one(client: httpx.AsyncClient, cfg: RunConfig, model: str, spec: RequestSpec, res: RequestResult,
               tokenizer: Any, on_done: Callable[[RequestResult], None] | None) -> RequestResult:
    body = build_payload(spec, cfg.endpoint, model, cfg.ignore_eos, cfg.include_usage, cfg.extra_body)
    try:
        await send_request(client, cfg.root_url, cfg.endpoint, body, res, cfg.timeout, cfg.api_key, tokenizer)
    except asyncio.CancelledError:
        # Owned task cancelled by abort: keep its partial state as a `cancelled` record.
        res.error = "cancelled"
    if on_done is not None:
        on_done(res)
    return res


async def _dispatch(client: httpx.AsyncClient, cfg: RunConfig, model: str, specs: Iterator[RequestSpec],
                    gaps: Iterator[float], count: int | None, stopper: Stopper, tokenizer: Any,
                    on_done: Callable[[RequestResult], None] | None, warmup: bool = False) -> list[RequestResult]:
    results: list[RequestResult] = []
    inflight: set[asyncio.Task] = set()
    stop_wait = asyncio.ensure_future(stopper.dispatch.wait())
    start = time.perf_counter()
    next_t = 0.0
    try:
        i = 0
        while count is None or i < count:
            if i > 0:
                next_t += next(gaps)
            delay = start + next_t - time.perf_counter()
            if delay > 0:
                await asyncio.wait({stop_wait}, timeout=delay)
            while cfg.max_concurrency is not None and len(inflight) >= cfg.max_concurrency and not stop_wait.done():
                done, _ = await asyncio.wait(inflight | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                inflight -= done
            if stop_wait.done():
                break
            spec = next(specs)
            res = RequestResult(index=i, prompt_len=spec.prompt_len, expected_output_len=spec.output_len, warmup=warmup)
            results.append(res)
            task = asyncio.create_task(_one(client, cfg, model, spec, res, tokenizer, on_done))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            i += 1
        abort_wait = asyncio.ensure_future(stopper.aborted.wait())
        while inflight and not abort_wait.done():
            await asyncio.wait(inflight | {abort_wait}, return_when=asyncio.FIRST_COMPLETED)
        abort_wait.cancel()
    finally:
        stop_wait.cancel()
        for task in list(inflight):
            task.cancel()
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)
    return results


async def run_load(cfg: RunConfig, specs: Iterator[RequestSpec], stopper: Stopper | None = None,
                   tokenizer: Any = None, on_done: Callable[[RequestResult], None] | None = None,
                   client: httpx.AsyncClient | None = None, on_start: Callable[[], None] | None = None) -> RunOutcome:
    """One measured run (plus its warm-up) at `cfg.arrival`."""
    stopper = stopper or Stopper()
    own = client is None
    client = client or make_client(cfg)
    try:
        model = await resolve_model(client, cfg)
        warm: list[RequestResult] = []
        if cfg.warmup:
            # Warm-up at the same concurrency, all at once: it exists to fill caches and compile paths.
            warm_stop = Stopper()
            if stopper.aborted.is_set():
                warm_stop.abort()
            warm = await _dispatch(client, cfg, model, specs, iter(lambda: 0.0, None), cfg.warmup, warm_stop,
                                   tokenizer, None, warmup=True)
        before = await scrape(client, cfg)
        timer = None
        if cfg.duration is not None:
            timer = asyncio.get_running_loop().call_later(cfg.duration, stopper.stop_dispatch)
        if on_start is not None:
            on_start()
        started_at, start = time.time(), time.perf_counter()
        gaps = interval_stream(cfg.arrival, cfg.seed)
        results = await _dispatch(client, cfg, model, specs, gaps, cfg.num_requests, stopper, tokenizer, on_done)
        duration = time.perf_counter() - start
        if timer is not None:
            timer.cancel()
        after = await scrape(client, cfg) if before is not None else None
    finally:
        if own:
            await client.aclose()
    return RunOutcome(cfg, model, results, warm, start, duration, started_at, stopper.aborted.is_set(), before, after)


async def run_sweep(cfg: RunConfig, rates: list[float], make_specs: Callable[[], Iterator[RequestSpec]],
                    stopper: Stopper | None = None, tokenizer: Any = None,
                    on_done: Callable[[RequestResult], None] | None = None,
                    on_run: Callable[[int, float], None] | None = None) -> list[RunOutcome]:
    """One run per rate, same workload seed each time (so the rates see the same prompts); warm-up once."""
    stopper = stopper or Stopper()
    outcomes: list[RunOutcome] = []
    async with make_client(cfg) as client:
        for k, rate in enumerate(rates):
            if stopper.aborted.is_set():
                break
            stopper.rearm()
            run_cfg = replace(cfg, arrival=ArrivalConfig(rate, cfg.arrival.burstiness), warmup=cfg.warmup if k == 0 else 0)
            start_cb = (lambda k=k, rate=rate: on_run(k, rate)) if on_run else None
            outcomes.append(await run_load(run_cfg, make_specs(), stopper, tokenizer, on_done, client, start_cb))
    return outcomes
