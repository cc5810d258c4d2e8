"""`packserve loadtest`: load-test any OpenAI-compatible server; see the README's "Load testing" section.

Exit status: 0 done, 1 no request completed, 2 bad arguments, 130 interrupted by Ctrl-C (the partial
report is still written).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from packserve.loadtest.arrivals import ArrivalConfig
from packserve.loadtest.client import RequestResult
from packserve.loadtest.metrics import parse_slos
from packserve.loadtest.runner import RunConfig, RunOutcome, Stopper, run_load, run_sweep
from packserve.loadtest.workload import LengthDist, RequestSpec, dataset_requests, synthetic_requests


def _rate(text: str) -> float:
    return math.inf if text.strip().lower() in ("inf", "infinity") else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packserve loadtest", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--base-url", default="http://127.0.0.1:8000", help="server root (…/v1 is accepted too)")
    a("--endpoint", choices=["completions", "chat"], default="completions")
    a("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    a("--num-requests", type=int, default=None, help="measured requests (default 100 unless --duration)")
    a("--duration", type=float, default=None, help="stop sending after S seconds")
    a("--request-rate", type=_rate, default=math.inf, help="requests/s, or inf = all at once (default)")
    a("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier, >1 smoother")
    a("--max-concurrency", type=int, default=None, help="cap on in-flight requests (with inf rate: closed loop)")
    a("--sweep-rates", default=None, help="comma-separated rates (inf allowed): one run each, plus a curve")
    a("--input-len", default="128", help="N | uniform:LO:HI | lognormal:MEDIAN:SIGMA[:LO:HI] (prompt tokens)")
    a("--output-len", default="128", help="same forms, sent as max_tokens")
    a("--prefix-len", type=int, default=0, help="a shared prefix of N tokens (words without --tokenizer) "
                                                 "before every synthetic prompt, for prefix caches")
    a("--dataset", default=None, help="JSONL of {'prompt': ...} or ShareGPT {'conversations': [...]}")
    a("--tokenizer", default=None, help="local HF tokenizer folder: exact-length prompts, token counts")
    a("--seed", type=int, default=0)
    a("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    a("--warmup", type=int, default=0, help="requests sent before measuring (excluded)")
    a("--slo", default=None, help="goodput SLOs, e.g. ttft_ms=500,tpot_ms=50 (also itl_ms, e2e_ms)")
    a("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    a("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM/packserve extension)")
    a("--no-usage", action="store_true", help="do not send stream_options.include_usage")
    a("--no-server-metrics", action="store_true", help="do not scrape /metrics")
    a("--extra-body", default=None, help="JSON object merged into every request body")
    a("--out", default=None, help="output folder (default ./loadtest-YYYYmmdd-HHMMSS)")
    a("--no-plots", action="store_true")
    a("--no-progress", action="store_true")
    return p


class _Live:
    """Progress bar fed by request completions (stderr, so stdout keeps the table)."""

    def __init__(self, enabled: bool, total: int | None, console: Console) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("ok={task.fields[ok]} err={task.fields[err]}"), TimeElapsedColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.total = total
        self.task = None

    def start_run(self, label: str) -> None:
        if self.task is not None:
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task(label, total=self.total, ok=0, err=0)

    def done(self, r: RequestResult) -> None:
        if self.task is None:
            return
        t = self.progress.tasks[self.progress.task_ids.index(self.task)]
        ok, err = t.fields["ok"] + r.ok, t.fields["err"] + (not r.ok)
        self.progress.update(self.task, advance=1, ok=ok, err=err)


def _load_tokenizer(path: str | None) -> Any:
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _plots(args: argparse.Namespace, console: Console):
    """The plots module, or None with --no-plots or without matplotlib (an optional extra: packserve[loadtest])."""
    if args.no_plots:
        return None
    try:
        from packserve.loadtest import plots
    except ImportError as exc:
        if not getattr(args, "_warned_plots", False):
            args._warned_plots = True
            console.print(f"plots skipped: {exc.name or 'matplotlib'} is not installed "
                          "(pip install 'packserve[loadtest]'); report.json is complete without them")
        return None
    return plots


def _write_run(outcome: RunOutcome, out: Path, args: argparse.Namespace, slos: dict, workload: dict,
               console: Console) -> dict:
    from packserve.loadtest.report import build_report, print_tables, summary_tables, write_json

    report = build_report(outcome, slos, workload)
    write_json(report, out / "report.json")
    plots = _plots(args, console)
    if plots is not None:
        title = f"rate={report['config']['request_rate']}"
        plots.latency_cdfs(outcome.results, out / "latency_cdf.png", title)
        plots.throughput_over_time(report["timeseries"], out / "throughput.png")
    print_tables(summary_tables(report), console)
    return report


async def _amain(args: argparse.Namespace, cfg: RunConfig, rates: list[float] | None, slos: dict,
                 make_specs: Any, tokenizer: Any, out: Path, workload: dict, console: Console) -> int:
    stopper = Stopper()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        console.print("[yellow]Ctrl-C: stopping, writing the partial report (Ctrl-C again to quit now)")
        stopper.abort()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C raises KeyboardInterrupt as usual

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (ValueError, NotImplementedError, RuntimeError):
        pass  # not the main thread (e.g. called from a test thread): no signal wiring
    live = _Live(not args.no_progress, cfg.num_requests, Console(stderr=True))
    try:
        with live.progress:
            if rates is None:
                outcomes = [await run_load(cfg, make_specs(), stopper, tokenizer, live.done,
                                           on_start=lambda: live.start_run("requests"))]
            else:
                outcomes = await run_sweep(cfg, rates, make_specs, stopper, tokenizer, live.done,
                                           on_run=lambda k, r: live.start_run(f"rate {r}"))
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (ValueError, NotImplementedError, RuntimeError):
            pass
    interrupted = stopper.aborted.is_set()
    if rates is None:
        report = _write_run(outcomes[0], out, args, slos, workload, console)
        completed = report["metrics"]["completed"]
    else:
        from packserve.loadtest.report import SWEEP_SCHEMA, sweep_table, write_json

        runs = []
        for oc in outcomes:
            sub = out / f"rate_{oc.config.arrival.rate:g}"
            rep = _write_run(oc, sub, args, slos, workload, console)
            runs.append({"request_rate": rep["config"]["request_rate"], "report": f"{sub.name}/report.json",
                         "metrics": rep["metrics"]})
        sweep = {"schema": SWEEP_SCHEMA, "interrupted": interrupted,
                 "config": _write_cfg(outcomes[0], workload) if outcomes else {}, "runs": runs}
        write_json(sweep, out / "sweep.json")
        plots = _plots(args, console) if runs else None
        if plots is not None:
            plots.sweep_curve(runs, out / "sweep.png")
        console.print(sweep_table(sweep))
        completed = sum(r["metrics"]["completed"] for r in runs)
    console.print(f"report written to {out}/")
    if interrupted:
        return 130
    return 0 if completed else 1


def _write_cfg(outcome: RunOutcome, workload: dict) -> dict:
    from packserve.loadtest.report import config_dict

    cfg = config_dict(outcome, workload)
    cfg.pop("request_rate", None)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        slos = parse_slos(args.slo)
        input_len, output_len = LengthDist.parse(args.input_len), LengthDist.parse(args.output_len)
        rates = [_rate(r) for r in args.sweep_rates.split(",") if r.strip()] if args.sweep_rates else None
        extra = json.loads(args.extra_body) if args.extra_body else None
        if extra is not None and not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        num = args.num_requests if (args.num_requests or args.duration) else 100
        cfg = RunConfig(
            base_url=args.base_url, endpoint=args.endpoint, model=args.model, num_requests=num,
            duration=args.duration, arrival=ArrivalConfig(rates[0] if rates else args.request_rate, args.burstiness),
            max_concurrency=args.max_concurrency, timeout=args.timeout, warmup=args.warmup, seed=args.seed,
            ignore_eos=args.ignore_eos, include_usage=not args.no_usage, api_key=args.api_key,
            scrape_metrics=not args.no_server_metrics, extra_body=extra,
        )
        for r in rates or []:  # validate every rate up front, not halfway through a sweep
            RunConfig(**{**cfg.__dict__, "arrival": ArrivalConfig(r, args.burstiness)})
        if args.dataset and not Path(args.dataset).is_file():
            raise ValueError(f"--dataset {args.dataset}: no such file")
        if args.prefix_len < 0 or (args.prefix_len and args.dataset):
            raise ValueError("--prefix-len must be >= 0 and applies to synthetic prompts (not --dataset)")
    except (ValueError, json.JSONDecodeError) as exc:
        console.print(f"[red]packserve loadtest: {exc}")
        return 2
    tokenizer = _load_tokenizer(args.tokenizer)

    def make_specs() -> Iterator[RequestSpec]:
        if args.dataset:
            return dataset_requests(args.dataset, output_len, args.seed, tokenizer)
        return synthetic_requests(input_len, output_len, args.seed, tokenizer, args.prefix_len, special)

    # Completions prompts are encoded with the tokenizer's special tokens (a BOS) by the server: leave room.
    special = int(tokenizer.num_special_tokens_to_add()) if tokenizer is not None and args.endpoint == "completions" \
        and hasattr(tokenizer, "num_special_tokens_to_add") else 0

    workload = {"input_len": None if args.dataset else input_len.describe(), "output_len": output_len.describe(),
                "prefix_len": args.prefix_len, "dataset": args.dataset, "tokenizer": args.tokenizer}
    out = Path(args.out or time.strftime("loadtest-%Y%m%d-%H%M%S"))
    try:
        return asyncio.run(_amain(args, cfg, rates, slos, make_specs, tokenizer, out, workload, console))
    except RuntimeError as exc:  # e.g. model auto-detection failed: say so, no traceback
        console.print(f"[red]packserve loadtest: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
