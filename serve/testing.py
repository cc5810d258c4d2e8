"""Test and benchmark support: a real `packserve serve` in a subprocess on a free localhost port, and a driver
that feeds an engine requests while others decode.

    with ServerProcess(["--model", path], workdir) as server:
        httpx.get(server.url + "/health")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script() -> list[str]:
    """The installed `packserve` console script (what the container's ENTRYPOINT runs), else `python -m packserve`."""
    script = Path(sys.executable).with_name("packserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "packserve"]


class ServerProcess:
    """`packserve serve ARGS` on a free port, output in a log file; SIGTERM on stop."""

    def __init__(self, args: list[str], workdir: str | Path, env: dict | None = None, port_via_env: bool = False,
                 clean_env: bool = False, use_console_script: bool = False, ready_timeout: float = 120.0,
                 nofile: int | None = None):
        workdir = Path(workdir)
        self.ready_timeout = ready_timeout  # what `with ServerProcess(...)` waits for /health
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        base = dict(os.environ)
        if clean_env:  # only the flags configure it: no PACKSERVE_* leaks in from the caller's environment
            base = {k: v for k, v in base.items() if not k.startswith("PACKSERVE_")}
        full_env = {**base, "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        if port_via_env:
            full_env["PACKSERVE_PORT"] = str(self.port)
        else:
            args = [*args, "--port", str(self.port)]
        cmd = console_script() if use_console_script else [sys.executable, "-m", "packserve"]
        limit_files = None
        if nofile is not None:  # the open-file limit (soft and hard) of the server, e.g. the common 1024
            import resource

            def limit_files():
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen([*cmd, "serve", *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=workdir, env=full_env, preexec_fn=limit_files)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        try:
            return self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def run_with_arrivals(engine, prompts: list[list[int]], params, every: int, per_arrival: int = 1,
                      max_steps: int = 2000) -> list[list[int]]:
    """Step `engine` until all `prompts` finished, adding `per_arrival` of them every `every` steps (continuous
    batching: prompts join while others decode). Returns each prompt's generated token ids, in prompt order."""
    pending, done, step = list(enumerate(prompts)), {}, 0
    while pending or engine.has_unfinished():
        if step % every == 0:
            for _ in range(per_arrival):
                if pending:
                    i, p = pending.pop(0)
                    engine.add_request(p, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
        assert step < max_steps, "the engine did not finish"
    return [done[i] for i in range(len(prompts))]


# -- paged attention cases (the decode kernels' tests and benchmark) ------------------------------------------
def paged_case(lens: list[int], H: int, Hkv: int, D: int, block_size: int, seed: int = 0, dtype=None,
               device="cpu", table_dtype=None):
    """One decode step over a paged cache: (q, k_cache, v_cache, block tables as lists, block table tensor).
    Only the requests' slots are written (random); every other slot is NaN, so a kernel that reads outside a
    context shows. Blocks are shuffled (non-contiguous tables, padded with block 0), and q is a strided view
    (the query rows of a fused QKV output)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // block_size) for n in lens) + 7
    k_cache = torch.full((nblocks * block_size, Hkv, D), float("nan"))
    v_cache = torch.full((nblocks * block_size, Hkv, D), float("nan"))
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, i = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(perm[i:i + nb])
        i += nb
        for j in range(n):
            slot = tables[-1][j // block_size] * block_size + j % block_size
            k_cache[slot] = torch.randn(Hkv, D, generator=g)
            v_cache[slot] = torch.randn(Hkv, D, generator=g)
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=table_dtype or torch.long)
    q = torch.randn(len(lens), H + 2 * Hkv, D, generator=g)[:, :H]
    to = dict(device=device, dtype=dtype or torch.float32)
    return q.to(**to), k_cache.to(**to), v_cache.to(**to), tables, table.to(device)


def batch_view(block_ids: list[list[int]], ctx_lens: list[int], q_lens: list[int], block_size: int, device="cpu"):
    """A persistent batch (packserve.engine.input_batch) holding these requests, filled for one step: its view."""
    import torch

    from packserve.engine.input_batch import InputBatch
    from packserve.engine.request import Request, SamplingParams
    from packserve.engine.scheduler import ScheduledRequest

    entries = []
    for i, (blocks, c, n) in enumerate(zip(block_ids, ctx_lens, q_lens)):
        req = Request(f"v{i}", [1] * (c + n), SamplingParams(max_tokens=1))
        req.block_ids = list(blocks)
        entries.append(ScheduledRequest(req, n, c, True))
    width = max(len(b) for b in block_ids)
    batch = InputBatch(len(entries), width, sum(q_lens), block_size, torch.device(device))
    return batch.fill(batch.update(entries), [], [], [])


def gather_decode_meta(table, lens, block_size: int, dtype):
    """The torch paged path's metadata for one decode step (each request's blocks gathered, masked to its length:
    what the decode kernels replace), from the same builder the runner uses."""
    from packserve.layers.paged import build_paged_meta

    lens = [int(n) for n in lens.tolist()]
    view = batch_view(table.long().tolist(), [n - 1 for n in lens], [1] * len(lens), block_size, table.device)
    return build_paged_meta(view, block_size, "torch", table.device, dtype)


def gather_sdpa_decode(q, k_cache, v_cache, table, lens, block_size: int, scale: float):
    """One decode step through the torch paged path (gather + mask + SDPA). NaN slots inside gathered blocks
    would poison it: pass caches without NaN."""
    from packserve.layers.paged import paged_attention

    return paged_attention(q, k_cache, v_cache, gather_decode_meta(table, lens, block_size, q.dtype), scale)


# -- Triton interpreter --------------------------------------------------------------------------------------
def triton_interpreted() -> bool:
    """Whether triton.language was imported in interpreter mode (TRITON_INTERPRET=1 set before its first
    import: its library functions are decorated then)."""
    import triton.language as tl

    return type(tl.standard.sum).__name__ == "InterpretedFunction"


def interpreted_module(name: str, kernel: str):
    """Import module `name`; in interpreter mode, reload it if its `kernel` was decorated before the flag was on."""
    import importlib

    mod = importlib.import_module(name)
    if triton_interpreted() and type(getattr(mod, kernel)).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    return mod


def run_tests_in_interpreter(test_file: str | Path) -> None:
    """Run a kernel test file in a fresh pytest process with TRITON_INTERPRET=1 (for when this process imported
    triton without it); raises AssertionError with the output when a test fails or none ran."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONSAFEPATH="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                        str(Path(test_file).resolve())], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "test_interpreter_checks_in_subprocess" not in r.stdout
