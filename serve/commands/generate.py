"""`packserve generate --model PATH --prompt TEXT [...]`: offline generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="packserve generate", description="Generate offline with packed prefill.")
    ap.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--norm-mode", default="native", choices=["native", "rmsnorm", "crmsnorm"])
    ap.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    args = ap.parse_args(argv)

    from packserve import LLM, SamplingParams
    from packserve.engine.request import ParameterError

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        llm = LLM(args.model, backend=args.backend, dtype=args.dtype, norm_mode=args.norm_mode)
        outs = llm.generate(args.prompt, params)
    except ParameterError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    for o in outs:
        c = o.outputs[0]
        if args.json:
            print(json.dumps({"prompt": o.prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason}))
        else:
            print(f"{o.prompt!r} -> {c.text!r} [{c.finish_reason}]")
    return 0
