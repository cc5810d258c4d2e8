"""Prefix caching: requests that share a long system prompt, with and without the cache, in the same run.

Workload: one shared prefix of `--prefix` tokens, then `--requests` requests, each the prefix plus its own
suffix of 8-64 tokens (seeded), `--new-tokens` new tokens each, greedy, EOS ignored; the serving benchmark's Llama
shape (hidden 384 / intermediate 1024 / 6 layers), fp32, 2 threads. The requests arrive in `--waves` waves (the
first wave fills the cache for the later ones, as a chat service sees the same system prompt all day). Prints the
time and prompt tokens actually prefilled per configuration, the speed-up, and checks that both produce the same
tokens.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_llama_config  # noqa: E402


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from packserve import LLM, SamplingParams
    from packserve.checkpoints import build_tokenizer, save_checkpoint

    cfg = cpu_llama_config()
    rng = random.Random(0)
    prefix = [rng.randrange(10, cfg.vocab_size) for _ in range(args.prefix)]
    prompts = [prefix + [rng.randrange(10, cfg.vocab_size) for _ in range(rng.randrange(8, 65))]
               for _ in range(args.requests)]
    per_wave = -(-len(prompts) // args.waves)
    waves = [prompts[i:i + per_wave] for i in range(0, len(prompts), per_wave)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_checkpoint(AutoModelForCausalLM.from_config(cfg).eval(), build_tokenizer(), tmp)
        for caching in (False, True):
            llm = LLM(tmp, prefix_caching=caching)
            llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2, temperature=0))  # warm-up, off-prefix
            hits0 = llm.engine.stats.prefix_cache_hits
            t = time.perf_counter()
            outs = [o for wave in waves for o in llm.generate(wave, params)]
            elapsed = time.perf_counter() - t
            hit = llm.engine.stats.prefix_cache_hits - hits0
            results[caching] = (elapsed, [o.outputs[0].token_ids for o in outs], hit)
    total = sum(map(len, prompts))
    same = sum(a == b for a, b in zip(results[False][1], results[True][1]))
    print(f"{len(prompts)} requests in {len(waves)} waves, shared prefix {args.prefix} tokens, {total} prompt tokens, "
          f"{args.new_tokens} new tokens each; identical greedy tokens for {same}/{len(prompts)}")
    print(f"{'prefix caching':<16}{'time':>9}{'prompt tokens prefilled':>26}")
    for caching in (False, True):
        elapsed, _, hit = results[caching]
        print(f"{'on' if caching else 'off':<16}{elapsed:>8.2f}s{total - hit:>26,}")
    print(f"speed-up with the cache: {results[False][0] / results[True][0]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
