"""Fixtures for the load-test tests: deterministic fake OpenAI-compatible servers in subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).with_name("fake_server.py")
TTFT, ITL = 0.2, 0.02  # seconds; large enough that localhost overhead (~1-5 ms) stays inside the tolerance


def _start(*args: str):
    proc = subprocess.Popen([sys.executable, str(FAKE), *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line}")
    return proc, f"http://127.0.0.1:{line[1]}"


@pytest.fixture(scope="session")
def fake_url():
    """A fake server with Prometheus /metrics; ttft TTFT, inter-token gap ITL."""
    proc, url = _start("--ttft", str(TTFT), "--itl", str(ITL), "--metrics")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def fast_url():
    """A quick fake server without /metrics (stands in for a server that exposes none)."""
    proc, url = _start("--ttft", "0.01", "--itl", "0.005")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def fake_delays() -> tuple[float, float]:
    """(time to first token, gap between tokens) of `fake_url`, in seconds."""
    return TTFT, ITL
