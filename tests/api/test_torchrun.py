"""Two ranks started separately with torchrun's variables on 127.0.0.1 (as two hosts would be), each running
`packserve serve`: rank 0 serves HTTP, rank 1 is its worker; the tokens equal one process's, and stopping rank 0
stops rank 1 with exit code 0."""

from __future__ import annotations

import os
import subprocess
import sys

import openai

from packserve import LLM, SamplingParams
from packserve.distributed import free_port
from tests.support.server_process import ServerProcess


def test_two_ranks_launched_like_torchrun(tiny_model, tmp_path):
    master = str(free_port())
    args = ["--model", tiny_model, "--served-model-name", "tiny", "--tensor-parallel-size", "2",
            "--max-model-len", "256", "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]

    def env(rank):  # one rank per "host": LOCAL_RANK 0 and LOCAL_WORLD_SIZE 1 on each
        return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master}

    worker_log = open(tmp_path / "rank1.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "packserve", "serve", *args, "--port", "1"],
                              env={**os.environ, "PYTHONSAFEPATH": "1", **env(1)}, stdout=worker_log,
                              stderr=subprocess.STDOUT)
    server = ServerProcess(args, tmp_path, env=env(0))
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        prompt = [5, 9, 14, 200, 3]
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
        ref = LLM(tiny_model, device="cpu", dtype="float32", max_model_len=256).generate(
            [prompt], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0].text
        assert got == ref
    finally:
        server.stop()
    assert worker.wait(timeout=30) == 0, (tmp_path / "rank1.log").read_text()[-3000:]
