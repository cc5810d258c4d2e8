"""Offline generation throughput: transformers `generate` (one left-padded batch) vs packserve LLM.generate.

Workload (the serving workload of benchmarks/common.py): the first 32 cpu-lognormal prompts, 64 new tokens
each, EOS ignored, greedy. `--gpu`: the gpu-lognormal prompts (64, median 256, at most 2048 tokens) on the
Llama-3.2-1B shape in bf16 on CUDA, 128 new tokens each unless --new-tokens says otherwise; both sides on the GPU
(transformers with its default SDPA attention), packserve with its CUDA graphs.
Each side runs `--repeats` times (default 3; packserve after a small warm-up generate, as transformers gets one;
prefix caching off, or the repeats would find their prompts cached);
prints the median time and output tokens/s of each, every run's time, and the ratio of medians; checks that the
greedy tokens agree for most prompts (padded batches change rounding, so a few late divergences are expected on
random weights).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CPU_LOGNORMAL, GPU_LOGNORMAL, cpu_llama_config, gpu_llama_config,  # noqa: E402
                    hf_generate_padded, lognormal_prompts, serving_parser)


def main() -> int:
    ap = serving_parser()
    ap.add_argument("--gpu", action="store_true", help="gpu-lognormal on the Llama-3.2-1B shape, bf16, CUDA")
    args = ap.parse_args()
    if not args.gpu:  # on a GPU host the CPU threads only build the random weights: keep them all
        torch.set_num_threads(args.threads)
    if args.gpu and args.new_tokens == ap.get_default("new_tokens"):
        args.new_tokens = 128

    from transformers import AutoModelForCausalLM

    from packserve import LLM, SamplingParams
    from packserve.checkpoints import build_tokenizer, save_checkpoint

    cfg = gpu_llama_config() if args.gpu else cpu_llama_config()
    dtype = torch.bfloat16 if args.gpu else torch.float32
    prompts = lognormal_prompts(GPU_LOGNORMAL if args.gpu else CPU_LOGNORMAL, cfg.vocab_size,
                                None if args.gpu and args.prompts == ap.get_default("prompts") else args.prompts)
    L = max(map(len, prompts))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        save_checkpoint(hf, build_tokenizer(), tmp)
        if args.gpu:
            hf = hf.to("cuda")
        hf_runs = [hf_generate_padded(hf, prompts, args.new_tokens) for _ in range(args.repeats)]
        hf_tokens = hf_runs[0][1]
        del hf
        if args.gpu:
            torch.cuda.empty_cache()

        # prefix caching off: the repeats must not reuse the last run's KV
        opts = dict(device="cuda", dtype="bfloat16", max_model_len=L + args.new_tokens + 16) if args.gpu else {}
        llm = LLM(tmp, backend=args.backend, prefix_caching=False, **opts)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0))  # warm-up
        ours_runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = llm.generate(prompts, params)  # (returns host token ids: the device work is done)
            ours_runs.append(time.perf_counter() - t)
    t_hf, t_ours = statistics.median(t for t, _ in hf_runs), statistics.median(ours_runs)
    n_out = len(prompts) * args.new_tokens
    same = sum(o.outputs[0].token_ids == h for o, h in zip(outs, hf_tokens))
    where = f"{torch.cuda.get_device_name()}, bf16" if args.gpu else f"CPU, {args.threads} threads, fp32"
    print(f"{where}, torch {torch.__version__}; {len(prompts)} prompts ({sum(map(len, prompts))} tokens, longest {L}), "
          f"{args.new_tokens} new tokens each; greedy outputs identical for {same}/{len(prompts)} prompts")
    print(f"{'method':<34}{'time':>10}{'output tok/s':>15}   runs (median of {args.repeats})")
    print(f"{'transformers generate (padded)':<34}{t_hf:>9.2f}s{n_out / t_hf:>15,.0f}   "
          + " ".join(f"{t:.2f}" for t, _ in hf_runs))
    print(f"{'packserve LLM.generate':<34}{t_ours:>9.2f}s{n_out / t_ours:>15,.0f}   "
          + " ".join(f"{t:.2f}" for t in ours_runs))
    print(f"ratio packserve / transformers: {t_hf / t_ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
