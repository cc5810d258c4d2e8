"""Each request's outputs: its text (incremental detokenization), logprobs, and the one decision when it ends.

After every step the engine hands each request that sampled to `OutputProcessor.on_token`, which appends the new
token's text and decides whether the request ends (precedence in packserve.engine.stop: a stop string in the text,
then EOS / a stop token id, a completed structured output, then the length limits); the scheduler then frees the
request's blocks at once. Text that may still turn into a stop string is held back from the output until it
cannot.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from packserve.engine.detokenizer import IncrementalDetokenizer
from packserve.engine.request import CompletionOutput, FinishReason, Request, RequestOutput
from packserve.engine.stop import StopMatcher, token_finish

log = logging.getLogger(__name__)


@dataclass
class _Track:
    """Per-request output state."""

    request: Request
    prompt: str | None
    detok: IncrementalDetokenizer | None
    stop: StopMatcher | None = None
    text: str = ""
    logprobs: list = field(default_factory=list)
    finished_time: float | None = None


class OutputProcessor:
    def __init__(self, tokenizer, scheduler, sampler, max_model_len: int):
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # carries the end out: Scheduler.finish frees the blocks
        self.sampler = sampler  # holds per-request generators, dropped at the end
        self.max_model_len = max_model_len
        self._tracks: dict[str, _Track] = {}

    def add(self, req: Request, prompt: str | None) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids) if self.tokenizer is not None else None
        stop = StopMatcher(req.params.stop) if req.params.stop and detok is not None else None
        self._tracks[req.request_id] = _Track(req, prompt, detok, stop)

    def abort(self, request_id: str) -> RequestOutput | None:
        """The final output of a request the scheduler has just aborted (None if unknown)."""
        self.sampler.forget(request_id)
        track = self._tracks.pop(request_id, None)
        if track is None:
            return None
        track.finished_time = time.monotonic()
        return self._output(track)

    def on_token(self, req: Request, logprob) -> RequestOutput:
        """The request's output after this step. A request whose text handling fails (a detokenizer or
        stop-matcher error) is aborted alone and logged: the step's other requests still get their tokens and
        their ends."""
        try:
            return self._on_token(req, logprob)
        except Exception:
            log.exception("request %s aborted: its output could not be processed", req.request_id)
            self.scheduler.finish(req.request_id, FinishReason.ABORT)
            return self.abort(req.request_id) or self._output(_Track(req, None, None))

    def _on_token(self, req: Request, logprob) -> RequestOutput:
        track = self._tracks[req.request_id]
        now = time.monotonic()
        reason, stop = token_finish(req, self.max_model_len)
        if req.output_token_ids:  # (none when max_tokens=0: the prompt was scored; its sample is dropped)
            if req.first_token_time is None:
                req.first_token_time = now
            if logprob is not None:
                track.logprobs.append(logprob)
        if track.detok is not None and req.output_token_ids:
            track.detok.add(req.output_token_ids[-1])
            if reason is not None:
                track.detok.flush()
            full = track.detok.text
            hit = track.stop.feed(full) if track.stop is not None else None
            if hit is not None:
                idx, s = hit
                full = full[: idx + (len(s) if req.params.include_stop_str_in_output else 0)]
                reason, stop = FinishReason.STOP, s
            elif reason is None and track.stop is not None:
                full = full[: len(full) - track.stop.holdback]  # a tail that may still become a stop string
            track.text = full
        if reason is not None:
            self.scheduler.finish(req.request_id, reason, stop)
            track.finished_time = now
            self._tracks.pop(req.request_id, None)
            self.sampler.forget(req.request_id)
        return self._output(track)

    def _output(self, track: _Track) -> RequestOutput:
        req = track.request
        reason = req.finish_reason.value if req.finish_reason is not None else None
        within = None
        if track.detok is not None and not req.is_finished:
            within = track.detok.tokens_within(len(track.text))
        comp = CompletionOutput(0, track.text, list(req.output_token_ids), reason, req.stop_reason,
                                list(track.logprobs) if req.params.logprobs is not None else None, within)
        return RequestOutput(req.request_id, track.prompt, req.prompt_token_ids, [comp], req.is_finished,
                             prompt_logprobs=req.prompt_logprobs,
                             arrival_time=req.arrival_time, first_scheduled_time=req.first_scheduled_time,
                             first_token_time=req.first_token_time, finished_time=track.finished_time,
                             num_preemptions=req.num_preemptions, num_cached_tokens=req.num_cached_tokens)
