"""SIGTERM: new requests get 503, in-flight ones finish (or are aborted at the timeout), exit code 0."""

from __future__ import annotations

import signal
import time

import httpx


def _start(helpers, tiny_model, tmp_path, timeout: float):
    srv = helpers["ServerProcess"](["--model", tiny_model, "--max-model-len", "1024", "--shutdown-timeout",
                                    str(timeout), "--num-threads", "1", "--log-level", "info"], tmp_path)
    return srv.__enter__()  # waits for /health; stops the process if it never gets there


def test_sigterm_drains_then_exits_0(tiny_model, helpers, tmp_path):
    srv = _start(helpers, tiny_model, tmp_path, timeout=60)
    try:
        with helpers["inflight_stream"](srv.url, max_tokens=300):
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while True:  # the signal is handled asynchronously
                r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
                if r.status_code == 503:
                    break
                assert time.monotonic() < deadline, "still admitting after SIGTERM"
                time.sleep(0.05)
            assert r.json()["error"]["code"] == "shutting_down"
            assert httpx.get(srv.url + "/health").status_code == 503
            assert srv.proc.poll() is None, "exited before the in-flight request finished"
        assert srv.proc.wait(30) == 0, srv.log()
    finally:
        srv.stop()


def test_sigterm_timeout_aborts_in_flight(tiny_model, helpers, tmp_path):
    srv = _start(helpers, tiny_model, tmp_path, timeout=0.5)
    try:
        with helpers["inflight_stream"](srv.url, max_tokens=1000, finish_reason="abort"):
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(30) == 0, srv.log()
            assert time.monotonic() - t0 < 15
        assert "aborting 1 in-flight" in srv.log()
    finally:
        srv.stop()
