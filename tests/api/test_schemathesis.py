"""A bounded schemathesis run against /openapi.json: valid and invalid data, no 5xx anywhere."""

from __future__ import annotations

import zlib

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

EXAMPLES = 20


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, helpers):
    # A small context keeps generated max_tokens cheap; a key checks auth is fuzzed too.
    srv = helpers["InProcessServer"](tiny_model, max_model_len=48, max_n=4, api_keys=("fuzz",))
    yield srv
    srv.stop()


def _operations(url):
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers={"Authorization": "Bearer fuzz"})
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    return ops


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(fuzz_server, mode):
    from schemathesis import GenerationMode

    url = fuzz_server.url
    gen_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    failures, statuses = [], {}
    for op in _operations(url):
        try:
            strategy = op.as_strategy(generation_mode=gen_mode)
        except Exception:  # an operation without a body has no negative cases
            continue

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            # crc32, not hash(): string hashing is salted per process, which would undo derandomize=True.
            headers = {"Authorization": "Bearer fuzz"} if zlib.crc32(repr(case.body).encode()) % 4 else {}
            resp = case.call(base_url=url, headers=headers, timeout=60)
            statuses[(op.path, resp.status_code)] = statuses.get((op.path, resp.status_code), 0) + 1
            if resp.status_code >= 500:
                failures.append((op.path, case.body, resp.status_code, resp.text[:300]))

        try:
            run()
        except Unsatisfiable:  # e.g. no invalid request exists for GET /health
            assert mode == "negative"
    assert not failures, failures[:5]
    print(sorted(statuses.items()))
    # The run really exercised generation, not only errors.
    if mode == "positive":
        assert statuses.get(("/v1/completions", 200), 0) + statuses.get(("/v1/chat/completions", 200), 0) > 0
    else:
        assert sum(v for (p, s), v in statuses.items() if s == 400) > 0
    # The server is still healthy afterwards.
    import httpx

    assert httpx.get(url + "/health").status_code == 200
