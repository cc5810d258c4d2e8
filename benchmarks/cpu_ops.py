"""Each CPU C kernel against torch eager and torch.compile (inductor) of the same math, per ISA build.

The rule the CPU path follows: a hand-written kernel stays only where it wins on every ISA we support. This
prints, for the ops of a decode step at the serving model's shapes (hidden 384, 6 heads / 2 KV heads of 64,
intermediate 1024, vocab 32000, contexts of 300 tokens in 16-token blocks) and batch 1 and 32, the median time of:
the C kernel built for each ISA this CPU runs, eager torch, and inductor's compiled code for the eager function.
With `--avx2-libs` the process caps torch's own kernels at AVX2 too (set before torch loads: this re-runs itself
with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2), as on an AVX2-only CPU.

  python benchmarks/cpu_ops.py [--avx2-libs] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

AVX2_LIBS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cases(B: int):
    """name -> (C kernel call, eager torch function, its arguments)."""
    import torch
    import torch.nn.functional as F

    from packserve.kernels import cpu_ops

    g = torch.Generator().manual_seed(B)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, r, w = rnd(B, 384), rnd(B, 384), rnd(384)
    gate_up, logits = rnd(B, 2048), rnd(B, 32000)
    qkv, pos = rnd(B, 640), torch.randint(0, 300, (B,), generator=g)
    cos, sin = rnd(2048, 32), rnd(2048, 32)
    ctx, bs, H, Hkv, D = 300, 16, 6, 2, 64
    nb = -(-ctx // bs)
    kc, vc = rnd(B * nb * bs, Hkv, D), rnd(B * nb * bs, Hkv, D)
    table, lens, q = torch.randperm(B * nb, generator=g).view(B, nb), torch.full((B,), ctx), rnd(B, H, D)

    def add_norm(x, r, w):
        h = x + r
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w, h

    def silu_mul(gu):
        return F.silu(gu[:, :1024]) * gu[:, 1024:]

    def argmax(lg):
        return lg.argmax(-1)

    def rotary(qkv, pos, cos, sin):
        q = qkv[:, :512].view(-1, 8, 64)
        c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
        x1, x2 = q[..., :32], q[..., 32:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)

    def attention(q, kc, vc, table):
        k = kc.view(-1, bs, Hkv, D)[table].view(B, nb * bs, Hkv, D)[:, :ctx].transpose(1, 2)
        v = vc.view(-1, bs, Hkv, D)[table].view(B, nb * bs, Hkv, D)[:, :ctx].transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)

    qv = qkv[:, :512].view(B, 8, 64)
    return {
        "add+rmsnorm": (lambda: cpu_ops.rms_norm(x, w, 1e-6, residual=r), add_norm, (x, r, w)),
        "silu*up": (lambda: cpu_ops.silu_mul(gate_up), silu_mul, (gate_up,)),
        "argmax": (lambda: cpu_ops.argmax_rows(logits), argmax, (logits,)),
        "rotary q,k": (lambda: cpu_ops.rotary_(qv, pos, cos, sin), rotary, (qkv, pos, cos, sin)),
        "paged attention": (lambda: cpu_ops.paged_decode_attention(q, kc, vc, table, lens, bs, D ** -0.5),
                            attention, (q, kc, vc, table)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--avx2-libs", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.avx2_libs and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_LIBS})

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import timed  # after the ISA variables: common imports torch

    from packserve.kernels import cpu_lib

    torch.set_num_threads(args.threads)
    isas = cpu_lib.supported_isas()
    cpu = cpu_lib.cpu_model()
    print(f"CPU: {cpu}; builds {isas}; torch kernels at {torch.backends.cpu.get_cpu_capability()}; "
          f"{args.threads} threads; ms per call (median)")
    cols = [f"C {isa}" for isa in isas] + ["torch"] + ([] if args.no_compile else ["inductor"])
    print(f"{'op':<18}{'B':>4}" + "".join(f"{c:>12}" for c in cols) + "   best C / best torch")
    for B in (1, 32):
        for name, (ours, eager, inputs) in cases(B).items():
            row = []
            for isa in isas:
                cpu_lib.use(isa)
                row.append(timed(ours))
            row.append(timed(lambda: eager(*inputs)))
            if not args.no_compile:
                compiled = torch.compile(eager, dynamic=False)
                row.append(timed(lambda: compiled(*inputs)))
            best_torch = min(row[len(isas):])
            print(f"{name:<18}{B:>4}" + "".join(f"{t:>12.4f}" for t in row)
                  + f"   {min(row[:len(isas)]) / best_torch:.2f}x" + "".join(
                      f" ({isa} {t / best_torch:.2f}x)" for isa, t in zip(isas, row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
