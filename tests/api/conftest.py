"""Real servers for the API tests: `packserve serve` subprocesses and in-process uvicorn servers.

One session-scoped server per configuration (a subprocess start costs seconds of
imports). The main server runs the CLI with an API key and a small context;
in-process servers cover configurations that need a tiny queue or a fault
injected into the engine stream.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from tests.support.server_process import ServerProcess, free_port  # shared with the deploy and loadtest tests

API_KEY = "test-key-123"
MAX_MODEL_LEN = 256
INFLIGHT_PROMPT = "The quick brown fox"
INFLIGHT_TOKENS = 160




class InProcessServer:
    """uvicorn in a thread around create_app(ServerState) (configurable internals, e.g. fault injection)."""

    def __init__(self, model: str, max_waiting: int = 64, api_keys=(), max_n: int = 16, wrap_engine=None,
                 tool_call_parser: str = "auto", **engine_opts):
        import uvicorn

        from packserve.api.app import ServerState, create_app
        from packserve.engine.async_engine import AsyncEngine
        from packserve.engine.engine import LLMEngine, engine_config
        from packserve.metrics import EngineMetrics

        engine = LLMEngine(engine_config(model, device="cpu", dtype="float32", max_waiting=max_waiting,
                                         **engine_opts))
        self.metrics = EngineMetrics("tiny")
        self.async_engine = AsyncEngine(engine, on_step=self.metrics.on_step, on_idle=self.metrics.set_gauges)
        self.state = ServerState(engine=self.async_engine, model_name="tiny", metrics=self.metrics,
                                 max_waiting=max_waiting, max_n=max_n, api_keys=tuple(api_keys),
                                 tool_call_parser=tool_call_parser)
        if wrap_engine is not None:
            wrap_engine(self.state)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# -- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model(checkpoint_factory) -> str:
    return checkpoint_factory("llama")


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """The main server: the real CLI, an API key, a small context."""
    srv = ServerProcess(["--model", tiny_model, "--served-model-name", "llama", "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN),
                         "--max-waiting", "64", "--dtype", "float32", "--device", "cpu", "--num-threads", "2",
                         "--log-level", "warning"], tmp_path_factory.mktemp("server"))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def offline_llm(tiny_model):
    from packserve import LLM

    return LLM(tiny_model, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def read_sse(response: httpx.Response) -> tuple[list[dict], bool]:
    """(decoded data objects, whether [DONE] ended the stream)."""
    events, done = [], False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        events.append(json.loads(data))
    return events, done


def metric_values(url: str) -> dict[str, float]:
    """name{labels} -> value, parsed with prometheus_client's text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    text = httpx.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@contextlib.contextmanager
def inflight_stream(url: str, headers: dict | None = None, expected: str | None = None,
                    max_tokens: int = INFLIGHT_TOKENS, finish_reason: str = "length"):
    """A streaming completion running in the background for the duration of the block; it must end unharmed."""
    result: dict = {}
    first = threading.Event()

    def run():
        body = {"prompt": INFLIGHT_PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers or {}, timeout=120) as r:
                result["status"] = r.status_code
                text, reason, errors, done = "", None, [], False
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        errors.append(obj)
                        continue
                    for ch in obj["choices"]:
                        text += ch["text"]
                        reason = ch["finish_reason"] or reason
                    first.set()
                result.update(text=text, finish_reason=reason, errors=errors, done=done)
        except Exception as exc:  # reported by the assertions below
            result["exception"] = repr(exc)
        finally:
            first.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert first.wait(60), "the in-flight stream never started"
    yield result
    t.join(120)
    assert not t.is_alive(), "the in-flight stream did not finish"
    assert "exception" not in result, result
    assert result["status"] == 200 and result["done"] and not result["errors"], result
    assert result["finish_reason"] == finish_reason, result
    if expected is not None:
        assert result["text"] == expected


@pytest.fixture(scope="session")
def inflight_expected(server, auth) -> str:
    """What the in-flight stream must produce (non-streamed, greedy)."""
    body = {"prompt": INFLIGHT_PROMPT, "max_tokens": INFLIGHT_TOKENS, "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture
def inflight(server, auth, inflight_expected):
    """Context manager: a streaming request on the main server that must complete unharmed."""
    return lambda: inflight_stream(server.url, auth, inflight_expected)


@pytest.fixture(scope="session")
def helpers():
    return {"read_sse": read_sse, "metric_values": metric_values, "inflight_stream": inflight_stream,
            "ServerProcess": ServerProcess, "InProcessServer": InProcessServer, "API_KEY": API_KEY,
            "MAX_MODEL_LEN": MAX_MODEL_LEN}
