"""Metric math against the deterministic fake server (known TTFT, per-token gap, token counts).

Tolerance: within 5 ms or 5 %, whichever is larger."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket

import httpx
import numpy as np
import pytest

from packserve.loadtest.arrivals import ArrivalConfig, send_offsets
from packserve.loadtest.metrics import latency_stats, meets_slos, parse_slos, prometheus_deltas, summarize
from packserve.loadtest.report import build_report
from packserve.loadtest.runner import RunConfig, Stopper, run_load
from packserve.loadtest.workload import LengthDist, synthetic_requests

IN_WORDS, OUT = 20, 6


def tol(expected_s: float) -> float:
    return max(0.005, 0.05 * expected_s)


def close(measured, expected_s, what=""):
    assert measured is not None and abs(measured - expected_s) <= tol(expected_s), (what, measured, expected_s)


def specs(out=OUT, seed=0):
    return synthetic_requests(LengthDist("fixed", IN_WORDS), LengthDist("fixed", out), seed=seed)


def go(cfg, out=OUT, seed=0, **kw):
    return asyncio.run(run_load(cfg, specs(out, seed), **kw))


def server_truth(url, results, warmup=0, out=OUT, seed=0):
    """What the fake server actually did for each measured request: times when it sent each content chunk
    and the last event (same CLOCK_MONOTONIC as the client's perf_counter), turned into the metrics."""
    timeline = httpx.get(url + "/debug/timeline", trust_env=False).json()
    prompts = [s.prompt for s in itertools.islice(specs(out, seed), warmup + len(results))][warmup:]
    truth = []
    for r, prompt in zip(results, prompts):
        t = timeline[prompt]
        ttft, e2e = t["content"][0] - r.send_time, t["last"] - r.send_time
        truth.append({"ttft": ttft, "e2e": e2e, "itl": list(np.diff(t["content"])), "last": t["last"],
                      "server_ttft": t["content"][0] - t["accept"], "tpot": (e2e - ttft) / (r.output_tokens - 1)})
    return truth


def _check_run(oc, truth, ttft, itl, n, conc):
    for r, t in zip(oc.results, truth):
        assert r.output_tokens == OUT and r.token_source == "usage" and r.prompt_len == IN_WORDS
        assert len(r.itl) == OUT - 1  # chat's role-only chunk is not a token
        # Definitions, exactly: TPOT from E2E and TTFT; ITL gaps tile the span of content chunks.
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / (OUT - 1))
        assert sum(r.itl) == pytest.approx(r.chunk_times[-1] - r.chunk_times[0])
        # Against what the server did, per request (single ITL gaps get 3x: one late wake-up of a
        # loaded CI box moves a gap by several ms; their statistics below get the plain tolerance).
        close(r.ttft, t["ttft"], "ttft")
        close(r.e2e, t["e2e"], "e2e")
        close(r.tpot, t["tpot"], "tpot")
        assert all(abs(a - b) <= 3 * tol(b) for a, b in zip(r.itl, t["itl"]))
        # The server kept to its nominal schedule (loosely), so these are the known delays.
        assert abs(t["server_ttft"] - ttft) < 0.03 and all(abs(g - itl) < 0.015 for g in t["itl"])
    m = summarize(oc.results, oc.duration_s)
    expected = {"ttft_ms": [t["ttft"] for t in truth], "tpot_ms": [t["tpot"] for t in truth],
                "itl_ms": [g for t in truth for g in t["itl"]], "e2e_ms": [t["e2e"] for t in truth]}
    for key, vals in expected.items():
        for stat in ("mean", "median", "p90", "p99"):
            close(m[key][stat] / 1000, latency_stats(vals)[stat] / 1000, (key, stat))
    assert m["itl_ms"]["count"] == n * (OUT - 1) and m["tpot_ms"]["count"] == n
    assert m["completed"] == n and m["failed"] == 0 and m["errors"] == {}
    # Throughputs: exact against the definitions, then against the server's timeline (2 waves of 4).
    assert m["request_throughput"] == pytest.approx(n / oc.duration_s)
    assert m["output_token_throughput"] == pytest.approx(n * OUT / oc.duration_s)
    assert m["total_token_throughput"] == pytest.approx(n * (OUT + IN_WORDS) / oc.duration_s)
    true_duration = max(t["last"] for t in truth) - oc.start
    close(oc.duration_s, true_duration, "duration")
    assert abs(true_duration - math.ceil(n / conc) * (ttft + (OUT - 1) * itl)) < 0.06  # two waves, nominally
    rel = tol(true_duration) / true_duration
    assert m["request_throughput"] == pytest.approx(n / true_duration, rel=rel)
    assert m["output_token_throughput"] == pytest.approx(n * OUT / true_duration, rel=rel)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_latencies_and_throughputs(fake_url, fake_delays, endpoint):
    ttft, itl = fake_delays
    n, conc = 8, 4
    for attempt in range(2):  # wall-clock test on a shared box: one retry absorbs a stall; a real bug fails twice
        oc = go(RunConfig(fake_url, endpoint, model="fake", num_requests=n, max_concurrency=conc, warmup=1))
        assert len(oc.warmup_results) == 1 and len(oc.results) == n
        assert all(r.ok for r in oc.results), [r.error for r in oc.results]
        try:
            _check_run(oc, server_truth(fake_url, oc.results, warmup=1), ttft, itl, n, conc)
            return
        except AssertionError:
            if attempt:
                raise


def test_goodput_against_slos(fake_url, fake_delays):
    ttft, itl = fake_delays
    oc = go(RunConfig(fake_url, model="fake", num_requests=4))
    m_all = summarize(oc.results, oc.duration_s, parse_slos(f"ttft_ms={ttft * 1000 + 50},tpot_ms={itl * 1000 + 5}"))
    assert m_all["good_requests"] == 4 and m_all["goodput"] == pytest.approx(4 / oc.duration_s)
    m_none = summarize(oc.results, oc.duration_s, parse_slos(f"ttft_ms={ttft * 1000 / 2}"))
    assert m_none["good_requests"] == 0 and m_none["goodput"] == 0.0
    assert summarize(oc.results, oc.duration_s)["goodput"] is None
    assert meets_slos(oc.results[0], {"e2e_ms": 10_000.0})
    with pytest.raises(ValueError):
        parse_slos("latency=3")


def test_tpot_counts_tokens_not_chunks(fake_url, fake_delays):
    """Two tokens per chunk: ITL is the chunk gap, TPOT divides by tokens from usage."""
    ttft, itl = fake_delays
    oc = go(RunConfig(fake_url, model="fake-multi", num_requests=3, seed=11), seed=11)
    for r, t in zip(oc.results, server_truth(fake_url, oc.results, seed=11)):
        assert r.ok and r.output_tokens == OUT and len(r.chunk_times) == OUT // 2
        close(r.e2e, t["e2e"], "e2e")
        close(r.tpot, (t["e2e"] - t["ttft"]) / (OUT - 1), "tpot")
        assert abs(t["e2e"] - t["ttft"] - (OUT // 2 - 1) * itl) < 0.01  # chunk gaps, not token gaps
        assert all(abs(a - b) <= tol(b) for a, b in zip(r.itl, t["itl"]))


def test_token_counts_without_usage(fake_url, tmp_path):
    from packserve.checkpoints import build_tokenizer

    oc = go(RunConfig(fake_url, model="fake-nousage", num_requests=2))
    assert all(r.ok and r.token_source == "chunks" and r.output_tokens == OUT for r in oc.results)
    oc = go(RunConfig(fake_url, model="fake", num_requests=2, include_usage=False))
    assert all(r.token_source == "chunks" for r in oc.results)
    tok = build_tokenizer()
    oc = asyncio.run(run_load(RunConfig(fake_url, model="fake-nousage", num_requests=2), specs(), tokenizer=tok))
    for r in oc.results:
        assert r.token_source == "tokenizer"
        assert r.output_tokens == len(tok.encode(r.generated_text, add_special_tokens=False)) > 0


def test_model_auto_detected(fast_url):
    oc = go(RunConfig(fast_url, num_requests=1))
    assert oc.model == "fake" and oc.results[0].ok


def test_errors_counted_not_raised(fake_url, fast_url):
    def errors(url, model, n=4, **kw):
        oc = go(RunConfig(url, model=model, num_requests=n, **kw))
        m = summarize(oc.results, oc.duration_s)
        json.dumps(build_report(oc), allow_nan=False)  # a report is still writable
        return m

    m = errors(fast_url, "fake-500")
    assert m["errors"] == {"http_500": 4} and m["completed"] == 0 and m["failed"] == 4
    assert m["ttft_ms"]["mean"] is None and m["request_throughput"] == 0.0
    assert errors(fast_url, "fake-429")["errors"] == {"http_429": 4}
    flaky = errors(fast_url, "fake-flaky", n=9, max_concurrency=1)
    assert flaky["errors"] == {"http_429": 3} and flaky["completed"] == 6
    assert errors(fast_url, "fake-midstream", n=2)["errors"] == {"stream_error": 2}
    assert errors(fast_url, "fake-hang", n=2, timeout=0.5)["errors"] == {"timeout": 2}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert errors(dead, "fake", n=2)["errors"] == {"connect_error": 2}


def test_poisson_schedule_is_followed(fast_url):
    cfg = RunConfig(fast_url, model="fake", num_requests=12, arrival=ArrivalConfig(25.0), seed=5)
    oc = go(cfg, out=2)
    planned = send_offsets(cfg.arrival, 12, seed=5)
    actual = np.array([r.send_time - oc.start for r in oc.results])
    assert np.abs(actual - planned).max() < 0.010, (actual, planned)


def test_concurrency_cap_holds(fast_url):
    oc = go(RunConfig(fast_url, model="fake", num_requests=12, max_concurrency=3), out=4)
    events = sorted([(r.send_time, 1) for r in oc.results] + [(r.send_time + r.e2e, -1) for r in oc.results])
    assert max(itertools.accumulate(d for _, d in events)) <= 3


def test_prometheus_deltas_exclude_warmup(fake_url, fast_url):
    oc = go(RunConfig(fake_url, model="fake", num_requests=5, warmup=2, max_concurrency=5), out=2)
    sm = prometheus_deltas(oc.metrics_before, oc.metrics_after)
    assert sm["available"]
    assert sm["deltas"]["packserve:num_preemptions_total"] == 5
    assert sm["deltas"]["packserve:generation_tokens_total"] == 10
    hl = sm["highlights"]
    assert hl["packserve:num_preemptions_total"] == {"delta": 5.0}
    assert hl["packserve:request_queue_time_seconds"]["count"] == 5
    assert hl["packserve:request_queue_time_seconds"]["mean"] == pytest.approx(0.01)
    assert hl["packserve:prefill_packing_efficiency"]["mean"] == pytest.approx(0.9)
    oc = go(RunConfig(fast_url, model="fake", num_requests=1), out=2)
    assert prometheus_deltas(oc.metrics_before, oc.metrics_after) == {"available": False}


def test_duration_bound_and_abort(fake_url, fake_delays):
    ttft, itl = fake_delays
    oc = go(RunConfig(fake_url, model="fake", duration=0.6, arrival=ArrivalConfig(20.0)))
    assert 3 <= len(oc.results) <= 40 and all(r.ok for r in oc.results)
    assert max(r.send_time - oc.start for r in oc.results) < 0.6 + 0.05  # nothing sent after the bound
    assert oc.duration_s < 0.6 + ttft + (OUT - 1) * itl + 0.2

    async def abort_soon():
        stopper = Stopper()
        asyncio.get_running_loop().call_later(0.5, stopper.abort)
        return await run_load(RunConfig(fake_url, model="fake", num_requests=10_000, arrival=ArrivalConfig(20.0)),
                              specs(), stopper)

    oc = asyncio.run(abort_soon())
    m = summarize(oc.results, oc.duration_s)
    assert oc.interrupted and oc.duration_s < 1.0
    assert m["cancelled"] >= 1 and m["completed"] >= 1 and m["sent"] < 100
    assert m["completed"] + m["cancelled"] + m["failed"] == m["sent"]


def test_prometheus_parsing_generic_vllm():
    from packserve.loadtest.metrics import parse_prometheus

    def text(n):
        return f"""# HELP vllm:prompt_tokens_total prompt tokens
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{model_name="m"}} {10 * n}
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="m"}} 3
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{{le="1.0",model_name="m"}} {n}
vllm:e2e_request_latency_seconds_bucket{{le="+Inf",model_name="m"}} {n}
vllm:e2e_request_latency_seconds_sum{{model_name="m"}} {0.5 * n}
vllm:e2e_request_latency_seconds_count{{model_name="m"}} {n}
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {n}
"""

    sm = prometheus_deltas(parse_prometheus(text(2)), parse_prometheus(text(7)))
    assert sm["deltas"] == {"vllm:prompt_tokens_total": 50.0, "vllm:e2e_request_latency_seconds_sum": 2.5,
                            "vllm:e2e_request_latency_seconds_count": 5.0}
    assert sm["highlights"] == {}


def test_latency_stats_hand_computed():
    """Known values (seconds in, milliseconds out), independent of summarize()."""
    st = latency_stats([0.001, 0.002, 0.003, 0.004])
    assert st["count"] == 4
    assert st["mean"] == pytest.approx(2.5) and st["median"] == pytest.approx(2.5)
    assert st["p90"] == pytest.approx(3.7) and st["p99"] == pytest.approx(3.97) and st["max"] == pytest.approx(4.0)
    assert st["std"] == pytest.approx(math.sqrt(1.25))
    assert latency_stats([])["mean"] is None
