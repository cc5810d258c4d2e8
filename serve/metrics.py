"""Prometheus metrics (vLLM's metric names under the `packserve:` prefix), fed from the engine's plain stats.

`EngineMetrics.on_step` runs in the engine loop thread after every step: it
turns EngineStats deltas into counters, sets the gauges, and observes the
per-request latency histograms from each RequestOutput's timestamps. Every
server owns its own CollectorRegistry, so several can live in one process.
All histograms have explicit buckets.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from packserve import distributed

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                         0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
PREFILL_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
EFFICIENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, L = self.registry, ["model_name"]
        self.model_name = model_name

        def gauge(name, doc):
            return Gauge(name, doc, L, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, L, registry=r).labels(model_name)

        def hist(name, doc, buckets):
            return Histogram(name, doc, L, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("packserve:num_requests_running", "Requests in the decode batch")
        self.waiting = gauge("packserve:num_requests_waiting", "Requests in the waiting queue")
        self.kv_usage = gauge("packserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)")
        self.prompt_tokens = counter("packserve:prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = counter("packserve:generation_tokens", "Tokens generated")
        self.preemptions = counter("packserve:num_preemptions", "Requests preempted (KV freed, recomputed later)")
        self.padding_avoided = counter("packserve:padding_tokens_avoided",
                                       "Pad tokens a padded batch of the same prompts would have computed")
        self.prefix_queries = counter("packserve:prefix_cache_queries",
                                      "Tokens of admitted requests looked up in the prefix cache")
        self.prefix_hits = counter("packserve:prefix_cache_hits",
                                   "Tokens found in the prefix cache (their prefill skipped)")
        self.shared_prompt = counter("packserve:shared_prompt_tokens",
                                     "Prompt tokens of n > 1 / best_of siblings taken from the first sibling's KV "
                                     "blocks (their prefill skipped)")
        self._success = Counter("packserve:request_success", "Requests finished, by finish reason",
                                L + ["finished_reason"], registry=r)
        self._http_errors = Counter("packserve:http_errors", "HTTP error responses, by status code",
                                    L + ["status_code"], registry=r)
        self.ttft = hist("packserve:time_to_first_token_seconds", "Arrival to first generated token",
                         LATENCY_BUCKETS)
        self.tpot = hist("packserve:time_per_output_token_seconds",
                         "(e2e - ttft) / (output tokens - 1), per request", TOKEN_LATENCY_BUCKETS)
        self.itl = hist("packserve:inter_token_latency_seconds", "Gap between consecutive tokens of a request",
                        TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("packserve:e2e_request_latency_seconds", "Arrival to finish", LATENCY_BUCKETS)
        self.queue_time = hist("packserve:request_queue_time_seconds", "Arrival to first scheduled",
                               LATENCY_BUCKETS)
        self.prefill_tokens = hist("packserve:prefill_tokens_per_step", "Fresh prompt tokens packed in one step",
                                   PREFILL_TOKEN_BUCKETS)
        self.packing_eff = hist("packserve:prefill_packing_efficiency",
                                "Real tokens / token slots computed, per prefill step", EFFICIENCY_BUCKETS)
        # Per rank (tensor parallel: workers' totals reach rank 0 about once a second; rank 0's are current).
        self._step_seconds = Counter("packserve:tp_step_seconds",
                                     "Seconds each rank spent in steps' model work (forward pass and logits, its "
                                     "collectives included)", L + ["rank"], registry=r)
        self._collective_seconds = Counter("packserve:tp_collective_seconds",
                                           "Seconds each rank spent in collectives (all-reduces, step broadcasts, "
                                           "gathers), waiting for the other ranks included", L + ["rank"], registry=r)
        self._last = {"prompt": 0, "gen": 0, "pre": 0, "pad": 0, "pq": 0, "ph": 0, "sp": 0}
        self._last_step = 0  # engine.stats.steps already recorded: on_step also runs after aborts
        self._last_token_time: dict[str, float] = {}

    # -- engine loop thread -------------------------------------------------
    def on_step(self, engine, outputs, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        s = engine.stats
        self._inc(self.prompt_tokens, "prompt", s.prompt_tokens)
        self._inc(self.generation_tokens, "gen", s.generation_tokens)
        self._inc(self.preemptions, "pre", s.num_preemptions)
        self._inc(self.padding_avoided, "pad", s.padding_avoided)
        self._inc(self.prefix_queries, "pq", s.prefix_cache_queries)
        self._inc(self.prefix_hits, "ph", s.prefix_cache_hits)
        self._inc(self.shared_prompt, "sp", s.shared_prompt_tokens)
        self._rank_times()
        step = s.last_step
        if s.steps != self._last_step:  # a new engine step: record its prefill once
            self._last_step = s.steps
            if step.num_prefill_tokens:
                self.prefill_tokens.observe(step.num_prefill_tokens)
                self.packing_eff.observe(step.packing_efficiency)
        for out in outputs:
            self._on_output(out, now)
        self.set_gauges(engine)

    def set_gauges(self, engine, *_args) -> None:
        s = engine.stats  # refreshed by every step and abort
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage)

    def _rank_times(self) -> None:
        ranks = list(distributed.rank_seconds) or [(0.0, 0.0)]
        ranks[0] = (distributed.step_seconds, distributed.collective_seconds)
        for rank, (step, coll) in enumerate(ranks):
            self._inc(self._step_seconds.labels(self.model_name, str(rank)), f"step{rank}", step)
            self._inc(self._collective_seconds.labels(self.model_name, str(rank)), f"coll{rank}", coll)

    def _inc(self, counter, key: str, total: float) -> None:
        delta = total - self._last.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._last[key] = total

    def _on_output(self, out, now: float) -> None:
        rid = out.request_id
        n_out = len(out.outputs[0].token_ids) if out.outputs else 0
        if n_out and out.first_token_time is not None:
            prev = self._last_token_time.get(rid)
            if prev is None:
                self.ttft.observe(max(0.0, out.first_token_time - out.arrival_time))
                if out.first_scheduled_time is not None:
                    self.queue_time.observe(max(0.0, out.first_scheduled_time - out.arrival_time))
            else:
                self.itl.observe(max(0.0, now - prev))
            self._last_token_time[rid] = now
        if out.finished:
            self._last_token_time.pop(rid, None)
            reason = out.outputs[0].finish_reason if out.outputs else "abort"
            self._success.labels(self.model_name, reason or "abort").inc()
            end = out.finished_time if out.finished_time is not None else now
            e2e = max(0.0, end - out.arrival_time)
            self.e2e.observe(e2e)
            if n_out > 1 and out.first_token_time is not None:
                self.tpot.observe(max(0.0, (end - out.first_token_time) / (n_out - 1)))

    # -- HTTP side ----------------------------------------------------------
    def http_error(self, status: int) -> None:
        self._http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
