"""The Triton interpreter: whether it is on, reloading a kernel module under it, a test file in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
