"""`packserve build-kernels`: build the CPU C kernels ahead of time, so no server start ever compiles.

The Docker image runs it with `--isa all --ship` (each build runs on every CPU of its ISA level; `--ship` copies
the builds into the environment, `<sys.prefix>/share/packserve/cpu-kernels`, where they are found first and no
volume mounted over the home folder hides them); on a host, `packserve build-kernels` builds the variant this
CPU runs into the cache folder (PACKSERVE_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import shutil
import time

from packserve.kernels import cpu_lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="packserve build-kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default="auto", choices=("auto", "all", *cpu_lib.ISAS),
                    help="auto: what this CPU runs (PACKSERVE_CPU_ISA); all: every variant (images for any host)")
    ap.add_argument("--timeout", type=float, default=cpu_lib.BUILD_TIMEOUT_S, help="seconds per build")
    ap.add_argument("--ship", action="store_true",
                    help="also copy the builds into this environment (images: found first, read-only)")
    args = ap.parse_args(argv)
    if args.isa == "all":
        isas = list(cpu_lib.ISAS)
    elif args.isa == "auto":
        isa = cpu_lib.selected_isa()
        if isa is None:
            print("this CPU runs neither AVX2 nor AVX-512: packserve uses its torch paths (nothing to build)")
            return 0
        isas = [isa]
    else:
        isas = [args.isa]
    for isa in isas:
        marker = cpu_lib.library_path(isa).with_suffix(".failed")
        marker.unlink(missing_ok=True)  # an explicit build always tries again
        t = time.monotonic()
        path = cpu_lib.build(isa, timeout=args.timeout)
        if args.ship and path.parent != cpu_lib.shipped_dir():
            cpu_lib.shipped_dir().mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, cpu_lib.shipped_dir() / path.name)
            path = cpu_lib.shipped_dir() / path.name
        print(f"{isa}: {path} ({time.monotonic() - t:.1f} s)")
    return 0
