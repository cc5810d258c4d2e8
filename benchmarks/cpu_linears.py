"""CPU linear layers: torch's F.linear (MKL) vs packserve's two panel kernels (the hand-written panel GEMM and
oneDNN's brgemm micro-kernel, packserve.kernels.cpu_ops), on the serving model's weight shapes, at decode and
prefill row counts. Prints ms per call and each kernel's ratio to F.linear in the same run (below 1.00x: faster).

  python benchmarks/cpu_linears.py [--threads 2] [--rows 1,4,32,256,1024]
  PACKSERVE_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
      python benchmarks/cpu_linears.py     (everything capped at AVX2 on an AVX-512 machine)

The engine does not take these numbers from here: it times the same three at start-up per weight shape
(packserve.layers.cpu_gemm) and keeps the fastest per row count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed  # noqa: E402

SHAPES = {"qkv 640x384": (640, 384), "o 384x384": (384, 384), "gate/up 2048x384": (2048, 384),
          "down 384x1024": (384, 1024), "lm head 32000x384": (32000, 384)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,32,256,1024")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    from packserve.kernels import cpu_lib, cpu_ops

    torch.set_num_threads(args.threads)
    cpu_lib.wait()
    if not cpu_ops.available():
        print("the C kernels are not built on this machine: nothing to compare")
        return 1
    kernels = {"panel": cpu_ops.linear_packed}
    if cpu_ops.has_brgemm_linear():
        kernels["brgemm"] = cpu_ops.linear_brgemm
    print(f"CPU: {cpu_lib.cpu_model()}; kernels built for {cpu_lib.loaded_isa()}; {args.threads} threads; "
          f"torch {torch.__version__}; ms per call (ratio to F.linear)")
    print("| shape | rows | F.linear | " + " | ".join(kernels) + " |")
    print("|---|---|---|" + "---|" * len(kernels))
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g)
        packed = cpu_ops.pack_linear(w)
        for m in (int(r) for r in args.rows.split(",")):
            if n > 10000 and m > 64:  # the LM head sees the sampled rows only
                continue
            x = torch.randn(m, k, generator=g)
            ref = timed(lambda: F.linear(x, w), args.reps)
            cells = []
            for fn in kernels.values():
                torch.testing.assert_close(fn(x, packed), F.linear(x, w), atol=1e-3, rtol=1e-4)
                t = timed(lambda: fn(x, packed), args.reps)
                cells.append(f"{t:.3f} ({t / ref:.2f}x)")
            print(f"| {name} | {m} | {ref:.3f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
