"""The `packserve loadtest` command: report JSON, PNG plots, sweeps, bounds, Ctrl-C, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import packserve.loadtest
from packserve.commands.loadtest import main

PNG = b"\x89PNG\r\n\x1a\n"

REPORT_KEYS = {"schema", "started_at", "interrupted", "config", "metrics", "server_metrics", "timeseries", "warmup",
               "requests"}
METRIC_KEYS = {"duration_s", "sent", "completed", "failed", "cancelled", "errors", "total_input_tokens",
               "total_output_tokens", "request_throughput", "output_token_throughput", "total_token_throughput",
               "goodput", "good_requests", "slos", "token_sources", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"}
STAT_KEYS = {"count", "mean", "median", "std", "p90", "p99", "max"}


def _png_ok(path):
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG


def _check_report(rep, n):
    assert set(rep) == REPORT_KEYS and rep["schema"] == "packserve.loadtest.report/1"
    assert set(rep["metrics"]) == METRIC_KEYS
    assert all(set(rep["metrics"][k]) == STAT_KEYS for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"))
    assert rep["metrics"]["completed"] == n and len(rep["requests"]) == n
    ts = rep["timeseries"]
    assert len(ts["t_s"]) == len(ts["output_tokens_per_s"]) == len(ts["completions_per_s"])
    # Tokens over time integrate back to the total.
    assert sum(ts["output_tokens_per_s"]) * ts["bin_s"] == pytest.approx(rep["metrics"]["total_output_tokens"])


def test_single_run_report_and_plots(fake_url, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--base-url", fake_url + "/v1", "--model", "fake", "--num-requests", "6", "--max-concurrency", "3",
               "--input-len", "uniform:8:16", "--output-len", "4", "--warmup", "1", "--slo", "ttft_ms=1000,tpot_ms=100",
               "--ignore-eos", "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    _check_report(rep, 6)
    assert rep["config"]["input_len"] == "uniform:8:16" and rep["config"]["max_concurrency"] == 3
    assert rep["metrics"]["good_requests"] == 6 and rep["warmup"] == {"requests": 1, "errors": {}}
    assert rep["server_metrics"]["highlights"]["packserve:num_preemptions_total"] == {"delta": 6.0}
    _png_ok(out / "latency_cdf.png")
    _png_ok(out / "throughput.png")
    text = capsys.readouterr().out
    assert "TTFT" in text and "request throughput" in text


def test_without_matplotlib_the_run_skips_plots_only(fake_url, tmp_path, capsys, monkeypatch):
    """matplotlib is the optional loadtest extra: without it the report and tables are complete, plots skipped."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.delitem(sys.modules, "packserve.loadtest.plots", raising=False)
    monkeypatch.delattr(packserve.loadtest, "plots", raising=False)  # `from . import plots` reads it first
    out = tmp_path / "noplots"
    rc = main(["--base-url", fake_url, "--model", "fake", "--num-requests", "3", "--input-len", "uniform:8:16",
               "--output-len", "2", "--ignore-eos", "--out", str(out), "--no-progress"])
    assert rc == 0
    _check_report(json.loads((out / "report.json").read_text()), 3)
    assert not list(out.glob("*.png"))
    text = capsys.readouterr().out
    assert "plots skipped: matplotlib is not installed" in text and "TTFT" in text


def test_sweep(fast_url, tmp_path):
    out = tmp_path / "sweep"
    rc = main(["--base-url", fast_url, "--endpoint", "chat", "--num-requests", "5", "--sweep-rates", "20,inf",
               "--output-len", "3", "--input-len", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["schema"] == "packserve.loadtest.sweep/1" and not sweep["interrupted"]
    assert [r["request_rate"] for r in sweep["runs"]] == [20.0, "inf"]
    for run in sweep["runs"]:
        rep = json.loads((out / run["report"]).read_text())
        _check_report(rep, 5)
        assert rep["config"]["request_rate"] == run["request_rate"]
        assert rep["server_metrics"] == {"available": False}  # this fake exposes no /metrics
        _png_ok((out / run["report"]).parent / "latency_cdf.png")
    _png_ok(out / "sweep.png")


def test_dataset_and_duration(fast_url, tmp_path):
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"question {i}"}]})
                              for i in range(3)))
    out = tmp_path / "dur"
    t0 = time.monotonic()
    rc = main(["--base-url", fast_url, "--model", "fake", "--dataset", str(data), "--duration", "0.5",
               "--request-rate", "20", "--output-len", "2", "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0 and time.monotonic() - t0 < 5
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["dataset"] == str(data) and rep["config"]["duration_s"] == 0.5
    assert 1 <= rep["metrics"]["sent"] <= 40 and rep["metrics"]["failed"] == 0
    assert rep["metrics"]["total_input_tokens"] == 2 * rep["metrics"]["completed"]  # "question i" = 2 words
    assert not (out / "latency_cdf.png").exists()


def test_all_failed_exit_code_and_report(fast_url, tmp_path):
    out = tmp_path / "fail"
    rc = main(["--base-url", fast_url, "--model", "fake-500", "--num-requests", "3", "--out", str(out), "--no-progress"])
    assert rc == 1
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["errors"] == {"http_500": 3} and rep["requests"][0]["status"] == 500
    _png_ok(out / "latency_cdf.png")  # empty panels say "no samples", the file still exists


@pytest.mark.parametrize("argv", [
    ["--input-len", "uniform:9:1"],
    ["--slo", "speed=3"],
    ["--request-rate", "0"],
    ["--duration", "5"],  # inf rate, duration only, no concurrency cap: unbounded
    ["--endpoint", "chat", "--max-concurrency", "0"],
    ["--extra-body", "[1]"],
    ["--timeout", "inf"],
    ["--sweep-rates", "1,0"],
    ["--dataset", "/nonexistent.jsonl"],
])
def test_bad_arguments(argv, tmp_path):
    assert main(["--out", str(tmp_path), *argv]) == 2
    assert not (tmp_path / "report.json").exists()


def _server_requests(url):
    text = httpx.get(url + "/metrics", trust_env=False).text
    line = next(x for x in text.splitlines() if x.startswith("packserve:num_preemptions_total"))
    return float(line.split()[-1])


def test_ctrl_c_writes_partial_report(fake_url, tmp_path):
    out = tmp_path / "sigint"
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.Popen([sys.executable, "-m", "packserve", "loadtest", "--base-url", fake_url, "--model", "fake",
                             "--num-requests", "10000", "--request-rate", "20", "--output-len", "4", "--out", str(out), "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = _server_requests(fake_url)
        deadline = time.monotonic() + 30
        while _server_requests(fake_url) < before + 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    rep = json.loads((out / "report.json").read_text())
    m = rep["metrics"]
    assert rep["interrupted"] and m["completed"] >= 1 and m["sent"] < 10000
    assert m["completed"] + m["cancelled"] + m["failed"] == m["sent"]
    _png_ok(out / "latency_cdf.png")
    assert "interrupted" in stdout
