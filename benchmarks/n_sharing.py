"""n > 1 with the prompt computed once vs once per choice: 8 "cpu-lognormal" prompts (the serving model) sampled
n = 4 times each (seeds, temperature 1, 32 new tokens, EOS ignored), all in flight at once; the same engine
settings with siblings sharing the prompt's KV blocks (the default) and without (`share_prompt=False`), in one
process, alternated, medians. Prefix caching is off on both sides, so only sibling sharing saves prefill.

Prints wall time, prompt tokens computed (the prefill histogram's sum), the most KV blocks held at once, and the
ratio shared / separate (the outputs are the same tokens: checked).

  python benchmarks/n_sharing.py [--repeats 3] [--threads 2] [--n 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(engine, prompts, n: int, new_tokens: int) -> tuple[float, int, int, dict]:
    from packserve.engine.request import SamplingParams

    for p_idx, prompt in enumerate(prompts):
        for j in range(n):
            engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=1000 * p_idx + j,
                                                      ignore_eos=True), request_id=f"{p_idx}-{j}",
                               group=f"p{p_idx}")
    computed, peak, outs = 0, 0, {}
    t = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        computed += engine.stats.last_step.num_prefill_tokens
        peak = max(peak, engine.allocator.num_used)
    return time.perf_counter() - t, computed, peak, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import torch

    from common import CPU_LOGNORMAL, cpu_llama_config, lognormal_prompts, save_serving_checkpoint
    from packserve.engine.engine import LLMEngine, engine_config
    from packserve.kernels import cpu_lib

    torch.set_num_threads(args.threads)
    cpu_lib.wait()
    cfg = cpu_llama_config()
    prompts = lognormal_prompts(CPU_LOGNORMAL, cfg.vocab_size, args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        save_serving_checkpoint(cfg, tmp)
        engines = {name: LLMEngine(engine_config(tmp, prefix_caching=False, max_model_len=2048, share_prompt=share,
                                                 max_num_batched_tokens=8192))
                   for name, share in (("separate", False), ("shared", True))}
        for e in engines.values():
            run(e, prompts[:2], 2, 4)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in engines}
        stats, outputs = {}, {}
        for _ in range(args.repeats):
            for name, e in engines.items():
                dt, computed, peak, outs = run(e, prompts, args.n, args.new_tokens)
                times[name].append(dt)
                stats[name], outputs[name] = (computed, peak), outs
    same = outputs["shared"] == outputs["separate"]
    print(f"CPU: {cpu_lib.cpu_model()}; ISA: {cpu_lib.loaded_isa()}; {args.threads} threads; torch {torch.__version__}; "
          f"{args.prompts} prompts ({sum(map(len, prompts))} tokens) x n={args.n}, {args.new_tokens} new tokens; "
          f"medians of {args.repeats}; same tokens: {same}")
    base = statistics.median(times["separate"])
    for name in ("separate", "shared"):
        med = statistics.median(times[name])
        computed, peak = stats[name]
        print(f"{name:<9} {med:.3f} s  prompt tokens computed {computed:>6}  peak KV blocks {peak:>5}  "
              f"{med / base:.2f}x time")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
