"""When is a cached prefix worth using? Packed recomputation vs a continuation behind the cached blocks.

A cached prefix saves its prefill, but the rest of the prompt then runs as a continuation through the paged path
(its queries attend over the cached context, outside the packed prefill). Below some share of cached tokens
the continuation costs more than recomputing the whole prompt packed: SchedulerConfig.min_cached_fraction
(packserve.engine.scheduler.min_cached_fraction, by device) sets that bound.

Workload: `--prompts` prompts of `--length` tokens that share their first `share x length` tokens (cached by
a request run before), each with its own suffix; one new token each (prefill only), greedy. For each share, the
same prompts (fresh suffixes per repeat) run with the cache used (min_cached_fraction=0) and with it ignored
(min_cached_fraction=1: the whole prompt packed), alternating, on the serving benchmark's Llama shape (fp32).
Prints the median times, the ratio used/recomputed (< 1: using the cache wins) and whether the greedy first
tokens agree.

  python benchmarks/prefix_fraction.py                          # ~3 minutes on 2 cores
  PACKSERVE_CPU_KERNELS=0 python benchmarks/prefix_fraction.py  # the torch-only paths (per-request SDPA)
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_kernels_header, cpu_llama_config, long_prompt_parser, save_serving_checkpoint  # noqa: E402,E501


def main() -> int:
    ap = long_prompt_parser(4, 1000)
    ap.add_argument("--shares", default="0.1,0.2,0.33,0.5,0.8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from packserve import LLM, SamplingParams

    cfg = cpu_llama_config()
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0)
    print(cpu_kernels_header(f"{args.prompts} prompts of {args.length} tokens, {args.threads} threads"))
    print(f"{'share cached':>12}{'cache used':>12}{'recomputed':>12}{'ratio':>8}{'same tokens':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        save_serving_checkpoint(cfg, tmp)
        sides = {f: LLM(tmp, min_cached_fraction=f, max_num_batched_tokens=8192, num_kv_blocks=2048)
                 for f in (0.0, 1.0)}
        for llm in sides.values():
            llm.generate([[5] * 64], params)  # warm-up
        for share in (float(x) for x in args.shares.split(",")):
            n_cached = int(share * args.length)
            times: dict[float, list[float]] = {0.0: [], 1.0: []}
            same = True
            for r in range(args.repeats):
                prefix = [rng.randrange(10, cfg.vocab_size) for _ in range(n_cached)]
                prompts = [prefix + [rng.randrange(10, cfg.vocab_size) for _ in range(args.length - n_cached)]
                           for _ in range(args.prompts)]
                firsts = []
                for f, llm in sides.items():
                    llm.generate([prefix + [7]], params)  # caches the prefix's blocks (not timed)
                    t = time.perf_counter()
                    outs = llm.generate(prompts, params)
                    times[f].append(time.perf_counter() - t)
                    firsts.append([o.outputs[0].token_ids for o in outs])
                    if f == 0.0:
                        assert all(o.num_cached_tokens > 0 for o in outs) or n_cached < 16, "the cache was not used"
                same &= firsts[0] == firsts[1]
            used, recomputed = statistics.median(times[0.0]), statistics.median(times[1.0])
            print(f"{share:>12.2f}{used:>11.3f}s{recomputed:>11.3f}s{used / recomputed:>8.2f}{str(same):>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
