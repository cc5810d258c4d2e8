"""`packserve serve | generate | loadtest | build-kernels`: one console script; each command's parser and main
live in the module of this package named after it."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": "packserve.commands.serve",
        "generate": "packserve.commands.generate",
        "loadtest": "packserve.commands.loadtest",
        "build-kernels": "packserve.commands.build_kernels",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: packserve {serve,generate,loadtest,build-kernels} [options]   (packserve CMD --help for each)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    return int(module.main(argv[1:]) or 0)
