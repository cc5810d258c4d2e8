"""Offline API: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

from typing import Sequence

from packserve.engine.engine import LLMEngine, engine_config
from packserve.engine.request import RequestOutput, SamplingParams


class LLM:
    def __init__(self, model: str, **options):
        self.engine = LLMEngine(engine_config(model, **options))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str,
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        # All or nothing: a bad prompt (add_request validates it) takes back the ones queued before it.
        rids: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                rids.append(self.engine.add_request(p, sp))
        except Exception:
            for rid in rids:
                self.engine.abort_request(rid)
            raise
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in rids]

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (no-op without them)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
