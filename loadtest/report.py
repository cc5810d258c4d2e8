"""The JSON report and the summary table.

Report schema (`report.json`, one per run; `"schema": "packserve.loadtest.report/1"`). Times in the
`*_ms` objects are milliseconds; throughputs are per second of `metrics.duration_s` (the measured phase:
first send to last completion, warm-up excluded); `null` marks a value that does not exist (e.g. TPOT
stats when every request produced one token, goodput without SLOs).

    schema            "packserve.loadtest.report/1"
    started_at        ISO-8601 UTC time the measured phase began
    interrupted       true when Ctrl-C ended the run (the report then covers what had finished)
    config            {base_url, endpoint, model, num_requests, duration_s, request_rate ("inf" or number),
                       burstiness, arrival ("all-at-once"|"poisson"|"gamma"), max_concurrency, timeout_s,
                       warmup, seed, ignore_eos, input_len, output_len, prefix_len, dataset, tokenizer}
    metrics           {duration_s, sent, completed, failed, cancelled, errors: {kind: count},
                       total_input_tokens, total_output_tokens, request_throughput,
                       output_token_throughput, total_token_throughput, goodput, good_requests,
                       slos: {ttft_ms|tpot_ms|itl_ms|e2e_ms: limit}, token_sources: {usage|tokenizer|chunks: n},
                       ttft_ms, tpot_ms, itl_ms, e2e_ms: {count, mean, median, std, p90, p99, max}}
    server_metrics    {available: false} or {available: true, deltas: {sample name: after - before, summed
                       over label sets}, highlights: {packserve:num_preemptions_total: {delta},
                       packserve:prefill_packing_efficiency / packserve:request_queue_time_seconds:
                       {count, sum, mean}}}   (counters and histogram _sum/_count of `packserve:`/`vllm:`)
    timeseries        {bin_s, t_s: [bin start], output_tokens_per_s: [...], completions_per_s: [...]}
    warmup            {requests, errors: {kind: count}}
    requests          [{index, send_offset_s, prompt_tokens, output_tokens, expected_output_tokens,
                        token_source, ttft_ms, tpot_ms, e2e_ms, max_itl_ms, status, error, error_detail}]

A sweep writes `sweep.json` (`"schema": "packserve.loadtest.sweep/1"`): {schema, interrupted, config,
runs: [{request_rate, report (relative path of that run's report.json), metrics}]}.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .client import RequestResult
from .metrics import error_counts, prometheus_deltas, summarize, timeseries
from .runner import RunOutcome

REPORT_SCHEMA = "packserve.loadtest.report/1"
SWEEP_SCHEMA = "packserve.loadtest.sweep/1"


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 4)


def _rate(r: float) -> float | str:
    return "inf" if math.isinf(r) else r


def config_dict(outcome: RunOutcome, workload: dict[str, Any] | None = None) -> dict[str, Any]:
    c = outcome.config
    return {
        "base_url": c.base_url,
        "endpoint": c.endpoint,
        "model": outcome.model,
        "num_requests": c.num_requests,
        "duration_s": c.duration,
        "request_rate": _rate(c.arrival.rate),
        "burstiness": c.arrival.burstiness,
        "arrival": c.arrival.kind,
        "max_concurrency": c.max_concurrency,
        "timeout_s": c.timeout,
        "warmup": c.warmup,
        "seed": c.seed,
        "ignore_eos": c.ignore_eos,
    } | (workload or {})


def request_record(r: RequestResult, start: float) -> dict[str, Any]:
    return {
        "index": r.index,
        "send_offset_s": round(r.send_time - start, 6) if r.send_time else None,
        "prompt_tokens": r.prompt_len,
        "output_tokens": r.output_tokens,
        "expected_output_tokens": r.expected_output_len,
        "token_source": r.token_source,
        "ttft_ms": _ms(r.ttft),
        "tpot_ms": _ms(r.tpot),
        "e2e_ms": _ms(r.e2e),
        "max_itl_ms": _ms(max(r.itl)) if r.itl else None,
        "status": r.status,
        "error": r.error,
        "error_detail": r.error_detail,
    }


def build_report(outcome: RunOutcome, slos: dict[str, float] | None = None,
                 workload: dict[str, Any] | None = None) -> dict[str, Any]:
    started = dt.datetime.fromtimestamp(outcome.started_at, dt.timezone.utc).isoformat(timespec="seconds")
    return {
        "schema": REPORT_SCHEMA,
        "started_at": started,
        "interrupted": outcome.interrupted,
        "config": config_dict(outcome, workload),
        "metrics": summarize(outcome.results, outcome.duration_s, slos),
        "server_metrics": prometheus_deltas(outcome.metrics_before, outcome.metrics_after),
        "timeseries": timeseries(outcome.results, outcome.start, outcome.duration_s),
        "warmup": {"requests": len(outcome.warmup_results), "errors": error_counts(outcome.warmup_results)},
        "requests": [request_record(r, outcome.start) for r in outcome.results],
    }


def write_json(obj: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # allow_nan=False: a NaN would make the file unreadable to strict JSON parsers; fail loudly instead.
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)  # atomic: a Ctrl-C mid-write never leaves half a report
    return path


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def summary_tables(report: dict[str, Any]) -> list[Table]:
    """Two tables: counts and throughputs, then latency statistics."""
    m, c = report["metrics"], report["config"]
    title = f"{c['model']} @ {c['base_url']} ({c['endpoint']}, rate={c['request_rate']}"
    title += f", concurrency={c['max_concurrency']})" if c["max_concurrency"] else ")"
    if report["interrupted"]:
        title += " - interrupted, partial"
    run = Table(title=escape(title), show_header=False)  # escape: "[...]" would be read as rich markup
    run.add_column("metric", no_wrap=True)
    run.add_column("value", justify="right")
    rows = [
        ("completed / sent", f"{m['completed']} / {m['sent']}"),
        ("failed", f"{m['failed']} {m['errors'] or ''}".strip()),
        ("duration (s)", _fmt(m["duration_s"])),
        ("request throughput (req/s)", _fmt(m["request_throughput"])),
        ("output token throughput (tok/s)", _fmt(m["output_token_throughput"])),
        ("total token throughput (tok/s)", _fmt(m["total_token_throughput"])),
        ("input / output tokens", f"{m['total_input_tokens']} / {m['total_output_tokens']}"),
    ]
    if m["goodput"] is not None:
        slo = ",".join(f"{k}={v:g}" for k, v in m["slos"].items())
        rows.append((f"goodput (req/s, {slo})", _fmt(m["goodput"])))
    for name, val in report["server_metrics"].get("highlights", {}).items():
        rows.append((name, " ".join(f"{k}={v:.4g}" for k, v in val.items() if v is not None)))
    for label, val in rows:
        run.add_row(escape(label), escape(val))
    lat = Table(show_header=True)
    lat.add_column("latency (ms)", no_wrap=True)
    for col in ("mean", "median", "p90", "p99"):
        lat.add_column(col, justify="right", no_wrap=True)
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        lat.add_row(label, *(_fmt(m[key][k]) for k in ("mean", "median", "p90", "p99")))
    return [run, lat]


def sweep_table(sweep: dict[str, Any]) -> Table:
    t = Table(title="sweep: throughput vs latency")
    for col in ("rate", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "E2E p50", "errors"):
        t.add_column(col, justify="right")
    for run in sweep["runs"]:
        m = run["metrics"]
        t.add_row(str(run["request_rate"]), _fmt(m["request_throughput"]), _fmt(m["output_token_throughput"], 1),
                  _fmt(m["ttft_ms"]["median"]), _fmt(m["ttft_ms"]["p99"]), _fmt(m["tpot_ms"]["median"]),
                  _fmt(m["tpot_ms"]["p99"]), _fmt(m["e2e_ms"]["median"]), str(m["failed"]))
    return t


def print_tables(tables: list[Table] | Table, console: Console | None = None) -> None:
    console = console or Console()
    for t in tables if isinstance(tables, list) else [tables]:
        console.print(t)
