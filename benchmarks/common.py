"""Shared workload definitions for the benchmarks: the lognormal prompt-length workloads (GPU and a smaller
CPU one), the serving workload, and a timing helper."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    median_len: int
    max_len: int
    min_len: int = 8
    sigma: float = 0.9


CPU_LOGNORMAL = Workload("cpu-lognormal", 64, 128, 1024)
GPU_LOGNORMAL = Workload("gpu-lognormal", 64, 256, 2048)


def lognormal_prompts(w: Workload, vocab: int, num_prompts: int | None = None) -> list[list[int]]:
    """length = clip(exp(ln median + sigma z), min, max); z and token ids from one seeded generator."""
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(num_prompts or w.num_prompts):
        z = torch.randn(1, generator=g).item()
        n = int(min(max(math.exp(math.log(w.median_len) + w.sigma * z), w.min_len), w.max_len))
        prompts.append(torch.randint(10, vocab, (n,), generator=g).tolist())
    return prompts


def serving_parser():
    """Options shared by the serving-workload benchmarks (generate.py, serve.py): the serving workload by default."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="packserve attention backend (auto: varlen)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (medians are compared)")
    return ap


def long_prompt_parser(prompts: int, length: int):
    """Options shared by the CPU prefill benchmarks of long prompts (chunked_prefill.py, prefix_fraction.py)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--length", type=int, default=length, help="tokens per prompt")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (medians are compared)")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def cpu_llama_config(vocab: int = 32000):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048,
                       tie_word_embeddings=True, initializer_range=0.1, bos_token_id=1, eos_token_id=0)


def save_serving_checkpoint(cfg, path) -> None:
    """The serving model with seeded random weights and the offline tokenizer padded to its vocabulary, saved as a
    checkpoint folder at `path`."""
    from transformers import AutoModelForCausalLM

    from packserve.checkpoints import build_tokenizer, save_checkpoint

    torch.manual_seed(0)
    tok = build_tokenizer()
    tok.add_tokens([f"<t{i}>" for i in range(len(tok), cfg.vocab_size)])
    save_checkpoint(AutoModelForCausalLM.from_config(cfg), tok, path)


def gpu_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                       tie_word_embeddings=True, initializer_range=0.02, bos_token_id=1, eos_token_id=0,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})


def timed(fn, reps: int = 50, warmup: int = 2) -> float:
    """Median wall time of fn() in ms, after `warmup` calls (CPU: no device sync)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def timeit(fn, repeats: int, device: torch.device) -> float:
    """Median wall time in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(fn, device: torch.device, reps: int = 20, graph: bool = False) -> float:
    """Median seconds per call: triton's do_bench (CUDA events; CUDA-graph replays with graph=True) on GPU,
    wall time on CPU."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return timeit(fn, reps, device)


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of one left-padded batch (pad id 0)."""
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


def hf_generate_padded(hf, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """transformers `generate` on one left-padded batch, greedy, EOS disabled: (seconds, new tokens per prompt)."""
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids, mask = left_pad(prompts)
    ids, mask = ids.to(hf.device), mask.to(hf.device)
    L = ids.shape[1]
    with torch.no_grad():  # warm-up, as packserve gets one: first-call setup is not part of the measurement
        hf.generate(input_ids=ids[:2, -16:], attention_mask=mask[:2, -16:], max_new_tokens=4, do_sample=False)
    sync = torch.cuda.synchronize if hf.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    sync()
    return time.perf_counter() - t, out[:, L:].tolist()


def cpu_kernels_header(detail: str) -> str:
    """"CPU: <model>, <whether the C prefill operator runs, which build>; <detail>" (waits for the kernels)."""
    from packserve.kernels import cpu_lib, cpu_ops

    cpu_lib.wait()
    op = f"the C prefill operator ({cpu_lib.loaded_isa()} build)" if cpu_ops.has_varlen() else "no C prefill operator"
    return f"CPU: {cpu_lib.cpu_model()}, {op}; {detail}"
