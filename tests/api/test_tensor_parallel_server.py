"""`packserve serve --tensor-parallel-size 2` (CPU, gloo): streams like one process; killing a worker rank turns
/health to 503 and ends the server with a non-zero exit code within 10 s."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.server_process import ServerProcess


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.fixture(scope="module")
def tp_server(tiny_model, tmp_path_factory):
    srv = ServerProcess(["--model", tiny_model, "--served-model-name", "tiny", "--tensor-parallel-size", "2",
                         "--max-model-len", "256", "--device", "cpu", "--dtype", "float32", "--log-level", "warning"],
                        tmp_path_factory.mktemp("tp"))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_streams_the_same_tokens_as_offline(tp_server, tiny_model):
    from packserve import LLM, SamplingParams

    client = openai.OpenAI(base_url=tp_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    prompt = [5, 6, 7, 8, 9, 10]
    streamed = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                                                       temperature=0, stream=True) if c.choices]
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert "".join(streamed) == full.choices[0].text
    ref = LLM(tiny_model, device="cpu", dtype="float32", max_model_len=256).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=False))[0].outputs[0].text
    assert full.choices[0].text == ref
    # The workers' time counters reach rank 0 with the first step a second after the last report.
    time.sleep(1.2)
    client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    samples = {}
    for line in httpx.get(tp_server.url + "/metrics").text.splitlines():
        if line.startswith(("packserve:tp_step_seconds_total", "packserve:tp_collective_seconds_total")):
            name, rank = line.split("{")[0], line.split('rank="')[1].split('"')[0]
            samples[name, rank] = float(line.split()[-1])
    assert set(samples) == {(n, r) for n in ("packserve:tp_step_seconds_total", "packserve:tp_collective_seconds_total")
                            for r in ("0", "1")}
    assert all(v > 0 for v in samples.values()), samples  # both ranks stepped and all-reduced


def test_a_dead_worker_ends_the_server(tp_server):
    assert httpx.get(tp_server.url + "/health").status_code == 200
    workers = [p for p in _children(tp_server.proc.pid)  # (not multiprocessing's resource tracker)
               if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert workers, "no worker process found"
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.monotonic()
    saw_503 = False
    while tp_server.proc.poll() is None and time.monotonic() - t0 < 10:
        try:
            saw_503 |= httpx.get(tp_server.url + "/health", timeout=1).status_code == 503
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    code = tp_server.proc.wait(timeout=max(0.1, 10 - (time.monotonic() - t0)))
    assert code != 0 and time.monotonic() - t0 < 10
    assert saw_503 or "exiting" in tp_server.log()
