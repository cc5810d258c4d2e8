"""Every metric name the dashboards, autoscalers (HPA, KEDA, prometheus-adapter) and alert rules use appears in
the real server's /metrics output, and every label they filter or group on is one the server exports."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploy_helpers import TARGET_LABELS, label_names, metric_names, metric_queries

httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _console_script() -> list[str]:
    """The installed `packserve` console script (what the image's ENTRYPOINT runs)."""
    script = Path(sys.executable).with_name("packserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "packserve"]


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory) -> str:
    if importlib.util.find_spec("packserve.api") is None or importlib.util.find_spec("packserve.api.cli") is None:
        pytest.skip("packserve.api (the HTTP server) is not importable yet: rerun once it lands")
    from packserve.checkpoints import build_tiny_checkpoint

    work = tmp_path_factory.mktemp("deploy-server")
    model = build_tiny_checkpoint("llama", work / "tiny-llama")
    port = _free_port()
    # Only the flags below configure it: no PACKSERVE_* leaks in from the environment running the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSERVE_")}
    env.update(PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="false")
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*_console_script(), "serve", "--model", str(model), "--host", "127.0.0.1",
                                 "--port", str(port), "--served-model-name", "tiny", "--device", "cpu",
                                 "--dtype", "float32", "--max-model-len", "256", "--num-threads", "2"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after 180 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)
        # One finished request so that every histogram and labelled counter has a series, and one 400 for the
        # error counter (labelled by status code).
        ok = httpx.post(url + "/v1/completions", timeout=120,
                        json={"model": "tiny", "prompt": "hello world", "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200, ok.text
        bad = httpx.post(url + "/v1/completions", timeout=30, json={"model": "tiny", "prompt": "x", "max_tokens": 0})
        assert bad.status_code == 400, bad.text
        resp = httpx.get(url + "/metrics", timeout=10)
        assert resp.status_code == 200
        return resp.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exposed(text: str) -> tuple[set[str], set[str]]:
    """(sample names, label names on packserve samples) of an exposition text."""
    names, labels = set(), set()
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            names.add(s.name)
            if s.name.startswith("packserve:"):
                labels.update(s.labels)
    return names, labels


def test_every_metric_used_by_deploy_is_exported(metrics_text):
    used = metric_names(metric_queries())
    assert len(used) >= 15, sorted(used)
    exposed, _ = _exposed(metrics_text)
    missing = {name: sorted(src) for name, src in used.items() if name not in exposed}
    assert not missing, f"names used in deploy/ but absent from the server's /metrics: {missing}"


def test_every_label_used_by_deploy_is_exported(metrics_text):
    _, labels = _exposed(metrics_text)
    for source, exprs in metric_queries().items():
        for expr in exprs:
            if "packserve:" not in expr:
                continue
            unknown = label_names(expr) - labels - TARGET_LABELS
            assert not unknown, f"{source}: labels {unknown} are not on any packserve series ({expr})"


def test_metrics_cover_design_section_8(metrics_text):
    """The dashboards use the names DESIGN.md §8 fixes; the server exports them all."""
    exposed, labels = _exposed(metrics_text)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "num_preemptions_total",
                 "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "request_queue_time_seconds_bucket", "prefill_packing_efficiency_bucket",
                 "prefill_tokens_per_step_bucket", "padding_tokens_avoided_total"):
        assert f"packserve:{name}" in exposed, name
    assert "model_name" in labels
