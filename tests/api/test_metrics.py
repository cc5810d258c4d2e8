"""/metrics: parses with prometheus_client, the `packserve:` names, TTFT count == requests served."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

NAMES = {
    "gauge": ["packserve:num_requests_running", "packserve:num_requests_waiting", "packserve:kv_cache_usage_perc"],
    "counter": ["packserve:prompt_tokens", "packserve:generation_tokens", "packserve:request_success",
                "packserve:num_preemptions", "packserve:padding_tokens_avoided", "packserve:http_errors"],
    "histogram": ["packserve:time_to_first_token_seconds", "packserve:time_per_output_token_seconds",
                  "packserve:inter_token_latency_seconds", "packserve:e2e_request_latency_seconds",
                  "packserve:request_queue_time_seconds", "packserve:prefill_tokens_per_step",
                  "packserve:prefill_packing_efficiency"],
}


def _families(url):
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_metric_names_types_and_labels(server, auth):
    httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, headers=auth)
    fams = _families(server.url)
    for kind, names in NAMES.items():
        for name in names:
            assert name in fams, name
            assert fams[name].type == kind, (name, fams[name].type)
            assert all(s.labels.get("model_name") == "llama" for s in fams[name].samples), name


def test_ttft_count_equals_requests_served(server, auth, helpers):
    values = helpers["metric_values"]
    before = values(server.url)
    n_prompts, n_choices = 5, 2
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
        for i in range(n_prompts):
            r = c.post("/v1/completions", json={"prompt": f"Count {i}", "max_tokens": 4 + i, "n": n_choices,
                                                "temperature": 0})
            assert r.status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                 "stream": True})
        assert r.status_code == 200
        c.post("/v1/completions", json={"prompt": ""})  # rejected: never served
    after = values(server.url)
    served = n_prompts * n_choices + 1

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("packserve:time_to_first_token_seconds_count") == served
    assert delta("packserve:e2e_request_latency_seconds_count") == served
    assert delta("packserve:request_queue_time_seconds_count") == served
    assert delta("packserve:request_success_total{finished_reason=length}") == served
    gen = sum(n_choices * (4 + i) for i in range(n_prompts)) + 3
    assert delta("packserve:generation_tokens_total") == gen
    # ITL: one gap per token after the first.
    assert delta("packserve:inter_token_latency_seconds_count") == gen - served
    assert delta("packserve:prefill_tokens_per_step_count") >= 1
    assert after["packserve:prefill_packing_efficiency_sum"] <= after["packserve:prefill_packing_efficiency_count"]
    assert delta("packserve:http_errors_total{status_code=400}") == 1


def test_histograms_have_explicit_buckets(server):
    fams = _families(server.url)
    ttft = [s for s in fams["packserve:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    bounds = [s.labels["le"] for s in ttft]
    assert "0.001" in bounds and "640.0" in bounds and bounds[-1] == "+Inf"
    eff = [s.labels["le"] for s in fams["packserve:prefill_packing_efficiency"].samples
           if s.name.endswith("_bucket")]
    assert "0.95" in eff and "1.0" in eff


def test_prefill_histograms_count_engine_steps_not_hook_calls(tiny_model):
    """on_step also runs after aborts: a step's prefill is recorded once, however often the hook runs."""
    from packserve.engine.engine import LLMEngine, engine_config
    from packserve.engine.request import SamplingParams
    from packserve.metrics import EngineMetrics

    engine = LLMEngine(engine_config(tiny_model, device="cpu", dtype="float32"))
    metrics = EngineMetrics("tiny")
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=8), request_id="a")
    engine.add_request([9, 10], SamplingParams(max_tokens=8), request_id="b")
    metrics.on_step(engine, engine.step())
    metrics.on_step(engine, [engine.abort_request("a")])
    metrics.on_step(engine, [engine.abort_request("b")])
    text = metrics.render().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["packserve:prefill_tokens_per_step_count"] == 1
    assert samples["packserve:prefill_tokens_per_step_sum"] == 6
    assert samples["packserve:prefill_packing_efficiency_count"] == 1


def test_n_siblings_compute_the_prompt_once(server, auth, helpers):
    """n = 4 over HTTP: the prompt is prefilled once (prefill histogram), the other three take its KV blocks
    (shared-prompt counter) and compute only its last token."""
    import random

    values = helpers["metric_values"]
    prompt = [random.Random(7).randrange(3, 500) for _ in range(100)]  # unseen: no prefix-cache hit
    before = values(server.url)
    r = httpx.post(server.url + "/v1/completions", headers=auth, timeout=60,
                   json={"prompt": prompt, "max_tokens": 3, "n": 4, "temperature": 1.0, "seed": 5})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    after = values(server.url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("packserve:shared_prompt_tokens_total") == 3 * 99
    assert delta("packserve:prefill_tokens_per_step_sum") == 100  # separately: 400
