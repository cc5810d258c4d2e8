"""The cost of structured outputs: the serving workload (32 "cpu-lognormal" prompts, 64 new tokens each, the
serving model) generated free and with every request under a JSON schema, in one process, alternated, medians.

The schema (an array of at least 64 one-digit integers) cannot be complete within 64 tokens, so the constrained
output runs to max_tokens like the free one and both generate the same number of tokens; the ratio is constrained
time / free time (vLLM reports single-digit percent overhead with xgrammar). A third side runs every request with
two tools under tool_choice "auto" (the Hermes structural tag: free text until a call starts). Also prints the
first compile of the schema (cold) and a cached one.

  python benchmarks/structured.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 64}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
             "required": ["city", "unit"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from common import CPU_LOGNORMAL, cpu_llama_config, lognormal_prompts, save_serving_checkpoint
    from packserve import LLM, SamplingParams
    from packserve.api.tool_parsers import FORMATS
    from packserve.engine.request import GuidedSpec
    from packserve.kernels import cpu_lib

    torch.set_num_threads(args.threads)
    cpu_lib.wait()
    cfg = cpu_llama_config()
    prompts = lognormal_prompts(CPU_LOGNORMAL, cfg.vocab_size, 32)
    with tempfile.TemporaryDirectory() as tmp:
        save_serving_checkpoint(cfg, tmp)
        llm = LLM(tmp, prefix_caching=False, max_model_len=2048)
        spec = GuidedSpec("json_schema", json.dumps(SCHEMA))
        t = time.perf_counter()
        llm.engine.structured_outputs().compile(spec)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        llm.engine.structured_outputs().compile(spec)
        warm = time.perf_counter() - t
        free = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        constrained = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, structured=spec)
        tools = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, structured=GuidedSpec(
            "structural_tag", json.dumps(FORMATS["hermes"].structural_tag(TOOLS, "auto", True)), "tools"))
        sides = (("free", free), ("json schema", constrained), ("tools, auto", tools))
        for _, params in sides:
            llm.generate(prompts[:4], params)
        times: dict[str, list[float]] = {name: [] for name, _ in sides}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, params in sides:
                t = time.perf_counter()
                outs = llm.generate(prompts, params)
                times[name].append(time.perf_counter() - t)
                tokens[name] = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"CPU: {cpu_lib.cpu_model()}; ISA: {cpu_lib.loaded_isa()}; {args.threads} threads; torch {torch.__version__}; "
          f"medians of {args.repeats}")
    print(f"schema compile: first {cold * 1e3:.1f} ms, cached {warm * 1e3:.3f} ms")
    base = statistics.median(times["free"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<12} {med:.3f} s  {tokens[name]} tokens  {tokens[name] / med:.0f} tok/s  {med / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
