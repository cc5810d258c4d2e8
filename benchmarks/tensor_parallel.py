"""Tensor parallelism on CPU: TP=1 vs TP=2 step time, and what the per-step broadcast and the all-reduces cost.

The serving model (Llama, hidden 384, 6 layers, 6 heads / 2 KV heads, vocab 32000, fp32), B prompts of 128
random tokens, greedy, 65 new tokens; decode ms/step = (time of 65 new tokens - time of 1) / 64, medians. TP=2 runs
two processes on the same cores (each with half the threads), so on a 2-core machine no gain is expected: the point
is the overhead. It also reports rank 0's time in collectives (the step broadcast and the all-reduces).

  python benchmarks/tensor_parallel.py [--repeats 3] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def decode_ms(llm, prompts, new_tokens: int) -> float:
    from packserve import SamplingParams

    def run(n):
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - t

    return (run(new_tokens) - run(1)) / (new_tokens - 1) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=65)
    args = ap.parse_args()
    import torch

    from common import cpu_llama_config, save_serving_checkpoint
    from packserve import LLM, distributed
    from packserve.kernels import cpu_lib

    cpu_lib.wait()
    cfg = cpu_llama_config()
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_serving_checkpoint(cfg, tmp)
        rows = {}
        comm = {}
        for tp in (1, 2):
            with LLM(tmp, device="cpu", dtype="float32", tensor_parallel_size=tp, prefix_caching=False) as llm:
                for B in args.batches:
                    prompts = [torch.randint(10, cfg.vocab_size, (128,), generator=g).tolist() for _ in range(B)]
                    decode_ms(llm, prompts[:1], 3)  # warm
                    rows[(tp, B)] = statistics.median(decode_ms(llm, prompts, args.new_tokens)
                                                      for _ in range(args.repeats))
                    if tp == 2:  # rank 0's time in collectives, per decode step
                        c0 = distributed.collective_seconds
                        d = decode_ms(llm, prompts, args.new_tokens)
                        comm[B] = (distributed.collective_seconds - c0) * 1e3 / (2 * args.new_tokens), d
    print(f"CPU: {cpu_lib.cpu_model()}; ISA: {cpu_lib.loaded_isa()}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads in all; medians of {args.repeats}")
    print("decode ms/step     " + "  ".join(f"B={b:<6}" for b in args.batches))
    for tp in (1, 2):
        print(f"TP={tp}              " + "  ".join(f"{rows[(tp, b)]:<8.2f}" for b in args.batches))
    print("TP=2 / TP=1        " + "  ".join(f"{rows[(2, b)] / rows[(1, b)]:<8.2f}" for b in args.batches))
    for B, (c, d) in comm.items():
        print(f"TP=2 rank 0 at B={B}: {c:.2f} ms per step in collectives ({2 * cfg.num_hidden_layers} all-reduces "
              f"and one step broadcast, waiting for the other rank included) of ~{d:.2f} ms per decode step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
