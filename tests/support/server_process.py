"""A real `packserve serve` in a subprocess on a free localhost port (the API, deploy and load-test tests, and
the serving benchmarks, which put this folder on sys.path).

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
