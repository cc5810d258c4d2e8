"""Paged decode attention: packserve's kernels vs the torch gather + SDPA path, one decode step of one layer.

GPU (default when CUDA is there): the Triton kernel (packserve.kernels.paged_attention_triton) with its automatic splits
vs gathering each request's blocks and running SDPA with an additive mask (what the engine did before), Llama-3.2-1B
attention shape (32 heads, 8 KV heads, head dim 64), bf16, block size 16, requests of equal context length in
shuffled blocks. Prints microseconds per call and the KV bytes read per second (K and V of every context token).
CPU (`--cpu`): the C kernel (packserve.kernels.cpu_ops) vs the same torch path, the serving benchmark's attention
shape (6 heads, 2 KV heads, head dim 64), fp32, 2 threads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the test harness
from common import bench  # noqa: E402

from packserve.layers.paged_attention_layer import paged_attention  # noqa: E402
from engine_cases import gather_decode_meta  # noqa: E402


def case(B: int, ctx: int, H: int, Hkv: int, D: int, bs: int, dtype: torch.dtype, dev: torch.device):
    nb = -(-ctx // bs)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randperm(B * nb, generator=g).view(B, nb)
    k = torch.randn(B * nb * bs, Hkv, D, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    q = torch.randn(B, H, D, dtype=dtype, device=dev)
    return q, k, v, blocks.to(dev), torch.full((B,), ctx, dtype=torch.long, device=dev)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="the CPU C kernel instead of the GPU Triton kernel")
    args = ap.parse_args()
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the CPU kernel")
        return 1
    dev = torch.device("cuda" if gpu else "cpu")
    if gpu:
        from packserve.kernels.paged_attention_triton import num_splits, paged_decode_attention_triton

        H, Hkv, D, dtype = 32, 8, 64, torch.bfloat16
        cases = [(1, 4096), (1, 32768), (8, 8192), (32, 2048), (64, 4096), (256, 1024)]
        name = f"Triton paged decode ({torch.cuda.get_device_name()})"
    else:
        from packserve.kernels import cpu_ops

        torch.set_num_threads(2)
        H, Hkv, D, dtype = 6, 2, 64, torch.float32
        cases = [(1, 2048), (32, 256), (32, 1024)]
        name = "C paged decode (CPU, 2 threads)"
    bs, scale = 16, D ** -0.5
    print(f"{name}: H={H} Hkv={Hkv} D={D} {dtype}, block size {bs}")
    print(f"{'batch':>6}{'context':>9}{'splits':>8}{'kernel us':>11}{'GB/s':>8}{'torch us':>10}{'GB/s':>8}{'speed-up':>10}")
    for B, ctx in cases:
        q, k, v, table, lens = case(B, ctx, H, Hkv, D, bs, dtype, dev)
        if gpu:
            splits = num_splits(B, Hkv, ctx, dev)
            ours = lambda: paged_decode_attention_triton(q, k, v, table, lens, bs, scale, ctx)  # noqa: E731
        else:
            splits = 1
            ours = lambda: cpu_ops.paged_decode_attention(q, k, v, table, lens, bs, scale)  # noqa: E731
        meta = gather_decode_meta(table, lens, bs, dtype)  # built once per step in the engine too
        ref = lambda: paged_attention(q, k, v, meta, scale)  # noqa: E731
        err = (ours().float() - ref().float()).abs().max().item()
        assert err < (2e-2 if dtype != torch.float32 else 1e-4), f"kernel and torch path disagree: {err}"
        t_ours, t_ref = bench(ours, dev), bench(ref, dev)
        kv_bytes = 2 * B * ctx * Hkv * D * k.element_size()
        print(f"{B:>6}{ctx:>9}{splits:>8}{t_ours * 1e6:>11.1f}{kv_bytes / t_ours / 1e9:>8.0f}{t_ref * 1e6:>10.1f}"
              f"{kv_bytes / t_ref / 1e9:>8.0f}{t_ref / t_ours:>9.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
