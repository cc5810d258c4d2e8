"""Chunked prefill on CPU: long prompts prefilled in chunks of a small step budget vs whole, in the same run.

A prompt longer than the step's token budget (`max_num_batched_tokens`; the CPU server's is 2048) is prefilled
over several steps: each later chunk attends over the chunks before it through the paged KV cache. The same
prompts prefilled whole (a budget that holds them) are the baseline: the gap is what chunking costs.

Workload: `--prompts` prompts of `--length` tokens (seeded), one new token each (prefill only), greedy, on the
serving benchmark's Llama shape (fp32); budgets `--budgets` (chunked) and one that fits every prompt (whole),
alternated, medians of `--repeats`; first tokens checked equal.

  python benchmarks/chunked_prefill.py          # ~2 minutes on 2 cores
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
    ap = long_prompt_parser(2, 2000)
    ap.add_argument("--budgets", default="256,512,1024")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from packserve import LLM, SamplingParams

    cfg = cpu_llama_config()
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0)
    whole = args.prompts * args.length
    budgets = [int(b) for b in args.budgets.split(",")] + [whole]
    print(cpu_kernels_header(f"{args.prompts} prompts of {args.length} tokens, {args.threads} threads"))
    with tempfile.TemporaryDirectory() as tmp:
        save_serving_checkpoint(cfg, tmp)
        llms = {b: LLM(tmp, max_num_batched_tokens=b, prefix_caching=False, num_kv_blocks=1024) for b in budgets}
        for llm in llms.values():
            llm.generate([[5] * 64], params)  # warm-up
        times: dict[int, list[float]] = {b: [] for b in budgets}
        same = True
        for _ in range(args.repeats):
            prompts = [[rng.randrange(10, cfg.vocab_size) for _ in range(args.length)] for _ in range(args.prompts)]
            firsts = []
            for b, llm in llms.items():
                t = time.perf_counter()
                outs = llm.generate(prompts, params)
                times[b].append(time.perf_counter() - t)
                firsts.append([o.outputs[0].token_ids for o in outs])
            same &= all(f == firsts[-1] for f in firsts)
    base = statistics.median(times[whole])
    print(f"{'budget':>8}{'time':>10}{'vs whole':>10}")
    for b in budgets:
        t = statistics.median(times[b])
        print(f"{b if b != whole else 'whole':>8}{t:>9.3f}s{t / base:>9.2f}x")
    print(f"first tokens equal across budgets: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
