"""Decode step time on a GPU with and without CUDA graphs, against the memory-bandwidth floor (issue 14).

  python benchmarks/gpu_decode.py           Llama-3.2-1B shape, bf16, batches 1/16/64, 512-token contexts
  python benchmarks/gpu_decode.py --tiny    the CPU serving shape in fp32 (checks the script; no graphs on CPU)

A step is the engine's own `step()` (scheduling, the persistent input batch, forward, sampling, detokenization)
while B requests each decode one token, timed between device syncs; medians over the timed steps. The floor is
what one step must read, every weight once (the tied LM head included) plus the B requests' KV cache, over the
memory bandwidth measured in the same run (a 1 GiB device-to-device copy: read + write). Ratios: graphs vs eager
(below 1.00x: faster) and each vs the floor.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_llama_config, gpu_llama_config  # noqa: E402


def bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy (read + write), median of 10."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device=device)  # 1 GiB
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        t = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del x, y
    return 2 * (1 << 30) / statistics.median(times[2:])


def step_times(llm, batch: int, ctx: int, steps: int, vocab: int, device: torch.device) -> list[float]:
    """Seconds per decode step of `batch` requests with `ctx`-token prompts (after 3 warm steps)."""
    from packserve import SamplingParams

    engine = llm.engine
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + 5, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(torch.randint(10, vocab, (ctx,), generator=g).tolist(), params)
           for _ in range(batch)]
    while engine.scheduler.waiting:  # the prefill steps
        engine.step()
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the CPU serving shape in fp32")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from packserve import LLM
    from packserve.checkpoints import build_tokenizer, save_checkpoint

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = cpu_llama_config() if args.tiny else gpu_llama_config()
    batches = [int(b) for b in args.batches.split(",")]
    bw = bandwidth(device)
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # tied head counted once
        save_checkpoint(hf, build_tokenizer(), tmp)
        del hf
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * dtype.itemsize
        blocks = max(batches) * (-(-(args.context + args.steps + 8) // 16)) + 16
        for mode in ("graphs", "eager"):
            llm = LLM(tmp, device=device.type, dtype=str(dtype).removeprefix("torch."), enforce_eager=mode == "eager",
                      max_num_seqs=max(batches), num_kv_blocks=blocks, max_model_len=args.context + args.steps + 8)
            graphs = llm.engine.runner.graphs
            for B in batches:
                replays = graphs.num_replays if graphs is not None else 0
                results[mode, B] = statistics.median(step_times(llm, B, args.context, args.steps, cfg.vocab_size,
                                                                device))
                if mode == "graphs" and device.type == "cuda":
                    assert graphs is not None and graphs.num_replays > replays, "decode steps did not replay graphs"
            del llm, graphs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {dtype}, context {args.context}, "
          f"weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| batch | floor ms | graphs ms | eager ms | graphs / eager | graphs / floor | eager / floor |")
    print("|---|---|---|---|---|---|---|")
    for B in batches:
        floor = (weight_bytes + B * args.context * kv_per_token) / bw * 1e3
        g, e = results["graphs", B] * 1e3, results["eager", B] * 1e3
        print(f"| {B} | {floor:.3f} | {g:.3f} | {e:.3f} | {g / e:.2f}x | {g / floor:.2f}x | {e / floor:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
