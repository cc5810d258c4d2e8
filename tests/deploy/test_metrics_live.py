"""Every metric name the dashboards, autoscalers (HPA, KEDA, prometheus-adapter) and alert rules use appears in
the real server's /metrics output, and every label they filter or group on is one the server exports."""

from __future__ import annotations


import pytest
from deploy_helpers import TARGET_LABELS, label_names, metric_names, metric_queries

from tests.support.server_process import ServerProcess

httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory) -> str:
    from packserve.checkpoints import build_tiny_checkpoint

    work = tmp_path_factory.mktemp("deploy-server")
    model = build_tiny_checkpoint("llama", work / "tiny-llama")
    # The installed console script (what the image's ENTRYPOINT runs); only these flags configure it.
    server = ServerProcess(["--model", str(model), "--host", "127.0.0.1", "--served-model-name", "tiny",
                            "--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--num-threads", "2"],
                           work, clean_env=True, use_console_script=True)
    with server:
        url = server.url
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
    """The dashboards use the `packserve:` metric names; the server exports them all."""
    exposed, labels = _exposed(metrics_text)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "num_preemptions_total",
                 "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "request_queue_time_seconds_bucket", "prefill_packing_efficiency_bucket",
                 "prefill_tokens_per_step_bucket", "padding_tokens_avoided_total"):
        assert f"packserve:{name}" in exposed, name
    assert "model_name" in labels
