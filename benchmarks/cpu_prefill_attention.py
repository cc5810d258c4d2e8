"""The CPU packed-prefill attention operator (kernels/csrc/varlen_attention.h) against torch's own CPU flash
attention (one causal SDPA call per prompt, which the varlen backend used before the operator), per ISA build.

Shapes of the serving model's attention (6 heads / 2 KV heads of 64, q/k/v column slices of the fused QKV
output): one layer of the 32 serving prompts (5,906 tokens, lognormal lengths 30-605), one 512-token prompt and
one 2048-token prompt. Prints the median of `--repeats` timings of each, its GFLOP/s (causal half: 4 L^2 H D / 2
per prompt) and the operator's time as a ratio to SDPA's, measured in the same run. `--avx2-libs` re-runs
itself with torch's kernels and oneDNN (which generates the operator's brgemm micro-kernels) capped at AVX2.

Then new tokens behind a cached context (chunked-prefill continuations, prefix-cache hits), from a paged cache of
16-token blocks: the C prefill operator (paged_prefill_attention, one call for every request) against the torch
path it replaced (per request: its blocks gathered, SDPA with a causal mask from its cached length).

  python benchmarks/cpu_prefill_attention.py [--avx2-libs] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed  # noqa: E402
from cpu_ops import AVX2_LIBS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--avx2-libs", action="store_true")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.avx2_libs and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_LIBS})

    import torch
    import torch.nn.functional as F

    from common import CPU_LOGNORMAL, lognormal_prompts
    from packserve.host import tune_malloc
    from packserve.kernels import cpu_lib, cpu_ops

    torch.set_num_threads(args.threads)
    tune_malloc()  # as the engine does: large outputs reuse heap memory instead of fresh page-faulted mmaps
    H, Hkv, D = 6, 2, 64
    workloads = {
        "32 serving prompts": [len(p) for p in lognormal_prompts(CPU_LOGNORMAL, 32000, 32)],
        "one 512-token prompt": [512],
        "one 2048-token prompt": [2048],
    }
    print(f"CPU: {cpu_lib.cpu_model()}; torch libs {'capped at AVX2' if args.avx2_libs else 'uncapped'}; "
          f"{args.threads} threads; medians of {args.repeats}")
    for isa in cpu_lib.supported_isas():
        cpu_lib.use(isa)
        if not cpu_ops.has_varlen():
            print(f"{isa}: no varlen operator in this build")
            continue
        for name, lens in workloads.items():
            T = sum(lens)
            qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=torch.Generator().manual_seed(T))
            q = qkv[:, :H * D].view(T, H, D)
            k = qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D)
            v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
            bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

            def sdpa():
                for a, b in bounds:
                    qh, kh, vh = (t[a:b].transpose(0, 1) for t in (q, k, v))
                    F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=D ** -0.5, enable_gqa=True)

            ours = timed(lambda: cpu_ops.varlen_attention(q, k, v, cu, D ** -0.5), args.repeats) / 1e3
            ref = timed(sdpa, args.repeats) / 1e3
            flops = sum(2 * l * l * H * D for l in lens)
            print(f"{isa:>7} {name:<22} operator {ours * 1e3:7.2f} ms ({flops / ours / 1e9:5.0f} GFLOP/s)   "
                  f"SDPA per prompt {ref * 1e3:7.2f} ms   ratio {ours / ref:.2f}x")
        for name, (ctx, new) in CONTINUATIONS.items():
            ours, ref = continuation_times(ctx, new, H, Hkv, D, args.repeats)
            print(f"{isa:>7} {name:<34} operator {ours * 1e3:7.2f} ms   per-request SDPA {ref * 1e3:7.2f} ms   "
                  f"ratio {ours / ref:.2f}x")
    return 0


# name -> (cached tokens, new tokens) per request
CONTINUATIONS = {
    "900 new behind 100 cached": ([100], [900]),
    "4 x (500 new behind 500 cached)": ([500] * 4, [500] * 4),
    "2048-token chunk behind 2048": ([2048], [2048]),
    "64 new behind 4000 cached": ([4000], [64]),
}


def continuation_times(ctx: list[int], new: list[int], H: int, Hkv: int, D: int, repeats: int) -> tuple[float, float]:
    """Seconds (medians) of the C prefill operator and of the per-request span path on the same paged cache."""
    import torch

    from packserve.kernels import cpu_ops
    from packserve.layers.paged_attention_layer import Span, span_attention

    bs, g = 16, torch.Generator().manual_seed(sum(new))
    nbs = [-(-(c + n) // bs) for c, n in zip(ctx, new)]
    kc, vc = torch.randn(sum(nbs) * bs, Hkv, D, generator=g), torch.randn(sum(nbs) * bs, Hkv, D, generator=g)
    perm = torch.randperm(sum(nbs), generator=g)
    tables = list(torch.split(perm, nbs))
    q = torch.randn(sum(new), H, D, generator=g)
    starts = torch.tensor([0, *new]).cumsum(0)[:-1]
    width = max(nbs)
    table = torch.stack([torch.cat([t, t.new_zeros(width - len(t))]) for t in tables])
    lens, qlens = torch.tensor([c + n for c, n in zip(ctx, new)]), torch.tensor(new)
    spans = [Span(int(a), n, c, t) for a, n, c, t in zip(starts, new, ctx, tables)]

    def torch_path():
        for s in spans:
            span_attention(q[s.start:s.start + s.num_new], kc, vc, s, bs, D ** -0.5)

    ours = timed(lambda: cpu_ops.paged_prefill_attention(q, kc, vc, table, lens, starts, qlens, bs, D ** -0.5),
                 repeats) / 1e3
    return ours, timed(torch_path, repeats) / 1e3


if __name__ == "__main__":
    sys.exit(main())
