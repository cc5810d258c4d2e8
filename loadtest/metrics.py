"""Aggregate metrics (vLLM `bench serve` definitions) and Prometheus `/metrics` deltas.

- request throughput = completed / duration; output token throughput = sum(output tokens) / duration;
  total token throughput = (sum(prompt tokens) + sum(output tokens)) / duration, completed requests only.
- TPOT per request = (E2E - TTFT) / (output_tokens - 1), only for output_tokens > 1; ITL pools every gap of
  every completed request.
- goodput = completed requests meeting every given SLO / duration (a request without a TPOT meets a TPOT
  SLO, as in vLLM). SLO keys: ttft_ms, tpot_ms, itl_ms (max gap), e2e_ms.
- latency statistics are in milliseconds: mean, median, std, p90, p99, max (numpy's linear percentiles).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from .client import RequestResult

SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
PERCENTILES = (90, 99)


def latency_stats(values_s: list[float]) -> dict[str, float | int | None]:
    """Stats in ms of a list of seconds; all None when empty (JSON null rather than NaN)."""
    out: dict[str, float | int | None] = {"count": len(values_s)}
    keys = ["mean", "median", "std"] + [f"p{p}" for p in PERCENTILES] + ["max"]
    if not values_s:
        return out | dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    out |= {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    out |= {f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}
    out["max"] = float(ms.max())
    return out


def parse_slos(text: str | None) -> dict[str, float]:
    """`ttft_ms=200,tpot_ms=50` -> {"ttft_ms": 200.0, "tpot_ms": 50.0}."""
    slos: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("e2el_ms", "e2e_ms")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {item!r}: use KEY=MS with KEY in {', '.join(SLO_KEYS)}")
        slos[key] = float(value)
        if not slos[key] > 0:
            raise ValueError(f"SLO {key} must be > 0 ms")
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    checks = {
        "ttft_ms": r.ttft,
        "tpot_ms": r.tpot or 0.0,
        "itl_ms": max(r.itl, default=0.0),
        "e2e_ms": r.e2e,
    }
    return all(checks[k] is not None and checks[k] * 1000.0 <= v for k, v in slos.items())


def error_counts(results: list[RequestResult]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in results if r.error is not None).items()))


def summarize(results: list[RequestResult], duration_s: float, slos: dict[str, float] | None = None) -> dict[str, Any]:
    """The `metrics` object of the report, over measured (non-warm-up) requests."""
    slos = slos or {}
    done = [r for r in results if r.ok]
    errors = error_counts(results)
    cancelled = errors.get("cancelled", 0)
    dur = max(duration_s, 1e-9)
    out_tok = sum(r.output_tokens or 0 for r in done)
    in_tok = sum(r.prompt_len or 0 for r in done)
    good = sum(meets_slos(r, slos) for r in done) if slos else None
    return {
        "duration_s": duration_s,
        "sent": len(results),
        "completed": len(done),
        "failed": len(results) - len(done) - cancelled,
        "cancelled": cancelled,
        "errors": errors,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": len(done) / dur,
        "output_token_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
        "goodput": None if good is None else good / dur,
        "good_requests": good,
        "slos": slos,
        "token_sources": dict(sorted(Counter(r.token_source or "none" for r in done).items())),
        "ttft_ms": latency_stats([r.ttft for r in done]),
        "tpot_ms": latency_stats([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": latency_stats([g for r in done for g in r.itl]),
        "e2e_ms": latency_stats([r.e2e for r in done]),
    }


def timeseries(results: list[RequestResult], start: float, duration_s: float, bin_s: float | None = None) -> dict:
    """Output tokens/s and completions/s per time bin since `start` (perf_counter seconds).

    Chunks are spread evenly: a request whose usage says T tokens over K content chunks adds T/K per chunk
    (servers may pack several tokens into one chunk)."""
    if bin_s is None:
        bin_s = max(0.05, duration_s / 60.0)
    nbins = max(1, math.ceil(duration_s / bin_s))
    tokens = np.zeros(nbins)
    completions = np.zeros(nbins)
    for r in results:
        if not r.ok or not r.chunk_times:
            continue
        per_chunk = (r.output_tokens or len(r.chunk_times)) / len(r.chunk_times)
        for t in r.chunk_times:
            tokens[min(nbins - 1, max(0, int((t - start) / bin_s)))] += per_chunk
        end = r.send_time + (r.e2e or 0.0)
        completions[min(nbins - 1, max(0, int((end - start) / bin_s)))] += 1
    return {
        "bin_s": bin_s,
        "t_s": [round(i * bin_s, 6) for i in range(nbins)],
        "output_tokens_per_s": (tokens / bin_s).tolist(),
        "completions_per_s": (completions / bin_s).tolist(),
    }


# ---- Prometheus ---------------------------------------------------------------------------------------

PACKSERVE_HIGHLIGHTS = (
    "packserve:prefill_packing_efficiency",
    "packserve:num_preemptions_total",
    "packserve:request_queue_time_seconds",
)
PREFIXES = ("packserve:", "vllm:")


def parse_prometheus(text: str) -> dict[str, dict[str, float]]:
    """{sample name: {label string: value}} for counter and histogram samples of our prefixes."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(PREFIXES) or fam.type not in ("counter", "histogram", "summary"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created") or s.name.endswith("_bucket"):
                continue  # creation timestamps and buckets are not deltas anyone reads in a summary
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out.setdefault(s.name, {})[labels] = float(s.value)
    return out


def prometheus_deltas(before: dict | None, after: dict | None) -> dict[str, Any]:
    """The report's `server_metrics` object: per-sample deltas plus a digest of the packserve highlights."""
    if before is None or after is None:
        return {"available": False}
    deltas: dict[str, float] = {}
    for name, series in after.items():
        total = sum(v - before.get(name, {}).get(lbl, 0.0) for lbl, v in series.items())
        deltas[name] = total
    highlights: dict[str, Any] = {}
    for name in PACKSERVE_HIGHLIGHTS:
        if name in deltas:
            highlights[name] = {"delta": deltas[name]}
        elif name + "_count" in deltas:
            cnt, tot = deltas[name + "_count"], deltas.get(name + "_sum", 0.0)
            highlights[name] = {"count": cnt, "sum": tot, "mean": tot / cnt if cnt else None}
    return {"available": True, "deltas": dict(sorted(deltas.items())), "highlights": highlights}
