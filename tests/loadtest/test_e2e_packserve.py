"""End to end: `packserve loadtest` against a real `packserve serve` on a tiny random Llama checkpoint.

Skips cleanly while packserve's HTTP server (packserve.api.app) does not exist yet."""

from __future__ import annotations

import json

import pytest

from packserve.commands.loadtest import main
from tests.support.server_process import ServerProcess




@pytest.fixture(scope="module")
def packserve_server(tmp_path_factory):
    from packserve.checkpoints import build_tiny_checkpoint

    work = tmp_path_factory.mktemp("loadtest-e2e")
    ckpt = build_tiny_checkpoint("llama", work / "tiny-llama")
    with ServerProcess(["--model", str(ckpt), "--num-threads", "2"], work) as server:
        yield server.url, ckpt


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_loadtest_against_packserve(packserve_server, tmp_path, endpoint):
    url, ckpt = packserve_server
    out = tmp_path / endpoint
    n, out_len = 8, 8
    rc = main(["--base-url", url, "--endpoint", endpoint, "--num-requests", str(n), "--max-concurrency", "4",
               "--input-len", "uniform:8:32", "--output-len", str(out_len), "--ignore-eos", "--tokenizer", str(ckpt),
               "--warmup", "1", "--seed", "3", "--timeout", "60", "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    m = rep["metrics"]
    assert m["completed"] == n and m["failed"] == 0 and m["errors"] == {}, m["errors"]
    assert rep["config"]["model"] == "tiny-llama"  # found through GET /v1/models
    assert m["token_sources"] == {"usage": n}  # packserve honours stream_options.include_usage
    assert m["total_output_tokens"] == n * out_len  # ignore_eos: every request runs to max_tokens
    assert all(r["prompt_tokens"] >= 8 for r in rep["requests"])
    assert m["ttft_ms"]["count"] == n and m["tpot_ms"]["count"] == n and m["itl_ms"]["count"] >= 1
    assert m["request_throughput"] > 0 and m["output_token_throughput"] > 0
    sm = rep["server_metrics"]
    assert sm["available"] and any(k.startswith("packserve:") for k in sm["deltas"])
    for png in ("latency_cdf.png", "throughput.png"):
        path = out / png
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_shared_prefix_workload_hits_packserve_prefix_cache(packserve_server, tmp_path):
    """--prefix-len: every prompt opens with the same 40 tokens, so after the first wave the server takes them
    from its prefix cache; the hit counter's delta shows in the report's server metrics."""
    url, ckpt = packserve_server
    out = tmp_path / "prefix"
    rc = main(["--base-url", url, "--num-requests", "6", "--max-concurrency", "1", "--prefix-len", "40",
               "--input-len", "8", "--output-len", "2", "--ignore-eos", "--tokenizer", str(ckpt), "--timeout", "60",
               "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["prefix_len"] == 40 and rep["metrics"]["completed"] == 6
    assert all(r["prompt_tokens"] >= 46 for r in rep["requests"])  # 40 + 8, give or take the junction token
    # Requests 2..6 each find the prefix's two full 16-token blocks cached.
    assert rep["server_metrics"]["deltas"]["packserve:prefix_cache_hits_total"] >= 5 * 32
