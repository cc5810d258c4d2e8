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
        # Validate everything before queueing anything: a bad prompt must not leave others half-submitted.
        ids = [self.engine.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
        from packserve.engine.request import validate_request

        for tok, sp in zip(ids, params):
            validate_request(tok, sp, self.engine.info.vocab_size, self.engine.max_model_len)
        rids = [self.engine.add_request(p, sp, prompt_token_ids=tok) for p, tok, sp in zip(prompts, ids, params)]
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
