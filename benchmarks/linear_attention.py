"""Linear attention prefill: our chunked kernel against the baselines, all measured in the same run.

For each total packed length T it times two layouts, one sequence of T tokens ("1xT") and T/1024 sequences
of 1024 ("Nx1024"), with:
  ours       packserve.kernels.linear_attention.linear_attention_chunked (Triton on CUDA, torch on CPU)
  quadratic  the masked quadratic form phi(Q) phi(K)^T (fp32 reference; skipped when T^2 scores do not fit)
  varlen     softmax flash attention, torch.nn.attention.varlen.varlen_attn (CUDA only), causal, same shapes
  fla        flash-linear-attention's chunk_linear_attn(scale=1.0, normalize=True) when installed (CUDA)
Inputs are feature-mapped (elu1) before timing, so every linear method sees the same phi(q), phi(k); the
script checks ours against fla's output and prints times (medians) and the ratios the issue targets:
ours within 1.2x of fla at T = 8k, faster than varlen flash attention for T >= 8k.

  python benchmarks/linear_attention.py            # CUDA: bf16, 16 heads, head dim 64, T = 2k..32k
  python benchmarks/linear_attention.py --quick    # CPU smoke run of the torch paths (fp32, 2 threads)
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from packserve.kernels.linear_attention import apply_feature_map, linear_attention_chunked
from packserve.kernels.linear_attention_torch import linear_attention_quadratic


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench  # noqa: E402


def varlen_fn() -> Callable | None:
    """varlen_attn with the causal argument its torch version takes (is_causal, or window_size=(-1, 0) in
    older releases), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)} if "window_size" in params else None
    if causal is None:
        return None
    return lambda q, k, v, cu, max_len: varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal)


def fla_fn() -> tuple[Callable, bool, str] | None:
    """(chunk_linear_attn, whether it takes cu_seqlens, version) when flash-linear-attention is installed."""
    try:
        import fla
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # not installed, or its kernels do not import on this build
        return None
    return chunk_linear_attn, "cu_seqlens" in inspect.signature(chunk_linear_attn).parameters, getattr(fla, "__version__", "?")


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def run_case(T: int, seq_len: int, args, device: torch.device, dtype: torch.dtype, varlen, fla) -> dict:
    H, D = args.heads, args.dim
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    lens = [seq_len] * (T // seq_len) + ([T % seq_len] if T % seq_len else [])
    host = [0]
    for n in lens:
        host.append(host[-1] + n)
    cu = torch.tensor(host, dtype=torch.int32, device=device)
    fq, fk = apply_feature_map(q, k, "elu1")
    row: dict = {"T": T, "layout": f"{len(lens)}x{seq_len}"}
    ours = lambda: linear_attention_chunked(fq, fk, v, cu, cu_seqlens_cpu=host, output_final_state=False)  # noqa: E731
    row["ours"] = bench(ours, device, args.reps)
    if H * T * T * 4 * 3 <= args.max_quadratic_gb * 2**30:  # scores, mask product, weights
        row["quadratic"] = bench(lambda: linear_attention_quadratic(fq, fk, v, cu), device, max(1, args.reps // 4))
    if varlen is not None and device.type == "cuda":
        row["varlen"] = bench(lambda: varlen(q, k, v, cu, max(lens)), device, args.reps)
    if fla is not None and device.type == "cuda":
        chunk_linear_attn, has_cu, _ = fla
        if has_cu:
            fla_call = lambda: chunk_linear_attn(fq[None], fk[None], v[None], scale=1.0, normalize=True,  # noqa: E731
                                                 cu_seqlens=cu.long())
        elif len(set(lens)) == 1:  # equal lengths: a batch is the same computation
            B = len(lens)
            shp = lambda x: x.view(B, seq_len, H, -1)  # noqa: E731
            fla_call = lambda: chunk_linear_attn(shp(fq), shp(fk), shp(v), scale=1.0, normalize=True)  # noqa: E731
        else:
            fla_call = None
        if fla_call is not None:
            row["fla"] = bench(fla_call, device, args.reps)
            row["err_vs_fla"] = max_rel(ours()[0], fla_call()[0].reshape(T, H, D))
    return row


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:8.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: small sizes, torch paths only")
    p.add_argument("--lengths", type=int, nargs="*", help="total packed lengths T")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=None, help="head dim (Dk = Dv)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    p.add_argument("--reps", type=int, default=None, help="CPU repeats (CUDA uses triton's do_bench)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (2: the CI machines' cores)")
    p.add_argument("--max-quadratic-gb", type=float, default=None, help="skip the quadratic form above this size")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    args.lengths = args.lengths or ([2048, 4096, 8192, 16384, 32768] if cuda else [1024, 2048])
    args.heads = args.heads or (16 if cuda else 4)
    args.dim = args.dim or (64 if cuda else 32)
    args.reps = args.reps or (20 if cuda else 3)
    args.max_quadratic_gb = args.max_quadratic_gb or (8.0 if cuda else 0.5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    varlen = varlen_fn() if cuda else None
    fla = fla_fn() if cuda else None
    import triton

    card = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"
    print(f"# {card}; torch {torch.__version__}, triton {triton.__version__}, "
          f"fla {fla[2] if fla else 'not installed'}, varlen_attn {'yes' if varlen else 'no'}")
    print(f"# heads {args.heads}, head dim {args.dim}, {dtype}, feature map elu1, normalized; times in ms (median)")
    cols = ("ours", "quadratic", "varlen", "fla")
    print(f"{'T':>6} {'layout':>8} " + " ".join(f"{c:>9}" for c in cols)
          + "  ours/fla  varlen/ours  quad/ours  err_vs_fla")
    for T in args.lengths:
        for seq_len in [T] + ([1024] if T > 1024 else []):
            r = run_case(T, seq_len, args, device, dtype, varlen, fla)
            ratio = lambda a, b: f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"  # noqa: E731
            err = f"{r['err_vs_fla']:.1e}" if "err_vs_fla" in r else "-"
            print(f"{T:>6} {r['layout']:>8} " + " ".join(f"{fmt_ms(r.get(c)):>9}" for c in cols)
                  + f"  {ratio('ours', 'fla'):>8}  {ratio('varlen', 'ours'):>11}  {ratio('quadratic', 'ours'):>9}  {err:>10}")


if __name__ == "__main__":
    main()
