"""Serving throughput: the HTTP server with all requests in flight at once vs transformers `generate` on one padded batch.

Workload (the serving workload of benchmarks/common.py): the first 32 cpu-lognormal prompts (token ids), 64 new
tokens each, EOS ignored, greedy; Llama shape hidden 384 / intermediate 1024 / 6 layers / 6 heads / 2 KV heads, fp32, 2 threads.
The server is a `packserve serve` subprocess on a free port; the client streams every request over SSE
(`--no-stream` for plain JSON). The baseline runs first, alone, so the two never share the CPU. The server tunes
glibc malloc for itself (packserve.host); the baseline runs with stock malloc unless `--tuned-baseline`.
Each side runs `--repeats` times (default 3) in the same invocation: the baseline first, alone, then the server
(warmed once; prefix caching off, or the repeats would find their prompts cached). Prints the median time and
output tokens/s of each, every run's time, and the ratio of medians.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CPU_LOGNORMAL, cpu_llama_config, hf_generate_padded, lognormal_prompts,  # noqa: E402
                    serving_parser)


def transformers_baseline(model_dir: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> list[float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    times = []
    for _ in range(repeats):
        elapsed, out = hf_generate_padded(hf, prompts, new_tokens)
        assert all(len(o) == new_tokens for o in out)
        times.append(elapsed)
    return times


async def _one(client, body: dict, stream: bool) -> int:
    if not stream:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]
    usage = None
    async with client.stream("POST", "/v1/completions",
                             json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                if obj.get("usage"):
                    usage = obj["usage"]["completion_tokens"]
    return usage


async def _all(url: str, prompts, new_tokens: int, stream: bool, repeats: int) -> list[tuple[float, int]]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        # Warm-up: one tiny request per timed request, concurrently, so the client holds a keep-alive connection
        # for each and the timed run measures serving rather than 32 TCP handshakes.
        warm = {"prompt": prompts[0][:16], "max_tokens": 4, "temperature": 0}
        await asyncio.gather(*(_one(client, warm, False) for _ in prompts))
        bodies = [{"prompt": p, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True} for p in prompts]
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            counts = await asyncio.gather(*(_one(client, b, stream) for b in bodies))
            runs.append((time.perf_counter() - t, sum(counts)))
        return runs


def serve_run(model_dir: str, prompts, new_tokens: int, threads: int, stream: bool, workdir: str,
              backend: str, repeats: int) -> list[tuple[float, int]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
    from server_process import ServerProcess  # the test harness

    args = ["--model", model_dir, "--num-threads", str(threads), "--dtype", "float32", "--backend", backend,
            "--max-num-seqs", str(max(64, len(prompts))), "--log-level", "warning",
            "--prefix-caching", "off"]  # the repeats send the same prompts: each run must prefill them
    with ServerProcess(args, workdir, ready_timeout=180) as server:
        return asyncio.run(_all(server.url, prompts, new_tokens, stream, repeats))


def main() -> int:
    ap = serving_parser()
    ap.add_argument("--no-stream", action="store_true", help="non-streamed JSON responses instead of SSE")
    ap.add_argument("--tuned-baseline", action="store_true",
                    help="give the transformers run packserve's glibc malloc settings too (packserve.host)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tuned_baseline:
        from packserve.host import tune_malloc

        assert tune_malloc(), "glibc malloc tuning unavailable here"

    from packserve.checkpoints import build_tokenizer, save_checkpoint

    cfg = cpu_llama_config()
    prompts = lognormal_prompts(CPU_LOGNORMAL, cfg.vocab_size, args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        save_checkpoint(AutoModelForCausalLM.from_config(cfg).eval(), build_tokenizer(), model_dir)
        hf_times = transformers_baseline(model_dir, prompts, args.new_tokens, args.repeats)
        runs = serve_run(model_dir, prompts, args.new_tokens, args.threads, not args.no_stream, tmp, args.backend,
                         args.repeats)
    n_out = len(prompts) * args.new_tokens
    assert all(n == n_out for _, n in runs), runs
    t_hf, t_srv = statistics.median(hf_times), statistics.median(t for t, _ in runs)
    mode = "JSON" if args.no_stream else "SSE"
    print(f"{len(prompts)} prompts ({sum(map(len, prompts))} tokens, longest {max(map(len, prompts))}), "
          f"{args.new_tokens} new tokens each, {args.threads} threads, fp32, median of {args.repeats} runs")
    print(f"{'method':<44}{'time':>10}{'output tok/s':>15}   runs")
    base = "transformers generate, tuned malloc" if args.tuned_baseline else "transformers generate (one padded batch)"
    print(f"{base:<44}{t_hf:>9.2f}s{n_out / t_hf:>15,.0f}   "
          + " ".join(f"{t:.2f}" for t in hf_times))
    print(f"{f'packserve serve, all in flight ({mode})':<44}{t_srv:>9.2f}s{n_out / t_srv:>15,.0f}   "
          + " ".join(f"{t:.2f}" for t, _ in runs))
    print(f"ratio packserve server / transformers: {t_hf / t_srv:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
