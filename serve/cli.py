"""`packserve serve | generate | loadtest | build-kernels`: one console script, one module per command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": "packserve.api.cli",
        "generate": "packserve.engine.cli",
        "loadtest": "packserve.loadtest.cli",
        "build-kernels": "packserve.kernels.cpu_build",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: packserve {serve,generate,loadtest,build-kernels} [options]   (packserve CMD --help for each)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    return int(module.main(argv[1:]) or 0)
