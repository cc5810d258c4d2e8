"""CPU matmul precision options on this CPU: the serving model's linear layers in fp32 (MKL), with oneDNN's bf16
fp32-precision mode (PACKSERVE_CPU_MATMUL_PRECISION=bf16: inputs rounded to bf16, fp32 accumulation), with bf16
weights and activations, and int8 weight-only (`torch.ops.aten._weight_int8pack_mm`, per-output-channel scales),
at 1 to 1024 rows. Prints ms per call (the five linears of one layer plus the LM head, summed) and each option's
ratio to fp32 (below 1.00x: faster), with the CPU model and whether it has AMX-BF16 / AVX512-BF16.

  python benchmarks/cpu_precision.py [--rows 1 4 8 16 32 64 256 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed  # noqa: E402

SHAPES = {"qkv": (640, 384), "o": (384, 384), "gate_up": (2048, 384), "down": (384, 1024), "lm_head": (32000, 384)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 256, 1024])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from packserve.engine.precision import cpu_has_bf16
    from packserve.kernels import cpu_lib

    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(n, kin, generator=g) for k, (n, kin) in SHAPES.items()}
    bf16 = {k: w.bfloat16() for k, w in weights.items()}
    int8 = {}
    for k, w in weights.items():
        scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
        int8[k] = ((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale)
    print(f"CPU: {cpu_lib.cpu_model()}; ISAs: {cpu_lib.supported_isas()}; bf16 matrix instructions: {cpu_has_bf16()}; "
          f"torch {torch.__version__}, {args.threads} threads; ms per layer + LM head, medians of 10")
    print(f"{'rows':>6} {'fp32':>9} {'bf16 mode':>16} {'bf16 tensors':>16} {'int8 weights':>16}")
    for m in args.rows:
        xs = {k: torch.randn(m, kin, generator=g) for k, (_, kin) in SHAPES.items()}

        def fp32():
            for k in SHAPES:
                F.linear(xs[k], weights[k])

        def bf16_tensors():
            for k in SHAPES:
                F.linear(xs[k].bfloat16(), bf16[k]).float()

        def int8_weights():
            for k in SHAPES:
                torch.ops.aten._weight_int8pack_mm(xs[k], *int8[k])

        base = timed(fp32, reps=10, warmup=3)
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            mode = timed(fp32, reps=10, warmup=3)
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        cells = [f"{t:8.3f} {t / base:5.2f}x" for t in (mode, timed(bf16_tensors, reps=10, warmup=3), timed(int8_weights, reps=3, warmup=3))]
        print(f"{m:>6} {base:9.3f} " + " ".join(f"{c:>16}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
