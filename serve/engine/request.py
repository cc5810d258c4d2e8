"""Request state, sampling parameters and outputs (plain data, no tensors)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # per stop string (a matched string is held back from streaming)
MAX_LOGIT_BIAS = 2048  # logit_bias entries per request (applied at every step)
MAX_STOP_TOKEN_IDS = 2048  # distinct stop_token_ids per request (checked at every step)
MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS = 256, 32  # bad word sequences per request, tokens per sequence


class ParameterError(ValueError):
    """Invalid request input; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code  # OpenAI's error code where it has a specific one (the API's default: invalid_value)


MIN_TEMPERATURE = 1e-5  # temperatures below this sample greedily


GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class GuidedSpec:
    """A structured-output constraint (packserve.engine.structured): its kind and text (a JSON schema as JSON
    text, a regex, an EBNF grammar, or the choices as a JSON list), and the request field it came from."""

    kind: str
    value: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise ParameterError(f"unknown structured output kind {self.kind!r}", self.param)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI / vLLM semantics). temperature == 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per sampled token
    # Logprob of every prompt token given the tokens before it (+ top n alternatives); the first is None.
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    # Added to the logits before sampling (OpenAI semantics: -100 bans a token, +100 all but forces it); token id
    # -> bias, stored as sorted (id, bias) pairs. Logprobs stay those of the model's raw distribution.
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's extra: sample only among these (empty: the whole vocabulary)
    # Token sequences never to generate: a sequence's last token is banned whenever the output ends with the rest.
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    structured: GuidedSpec | None = None  # constrained decoding (packserve.engine.structured)

    def __post_init__(self) -> None:
        # Accept lists for convenience but store tuples (frozen + hashable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        stop_ids = self.stop_token_ids or ()
        if len(stop_ids) > 16 * MAX_STOP_TOKEN_IDS:  # before the copy below: refuse a huge list without work
            raise ParameterError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids", "stop_token_ids")
        object.__setattr__(self, "stop_token_ids", tuple(dict.fromkeys(int(t) for t in stop_ids)))
        # max_tokens=0 scores the prompt only (echo + logprobs, as evaluation harnesses use it).
        min_tokens_out = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < min_tokens_out:
            raise ParameterError(f"max_tokens must be an integer >= {min_tokens_out}, got {self.max_tokens!r}"
                                 + (" (0 is allowed with prompt logprobs)" if min_tokens_out else ""), "max_tokens")
        _finite("temperature", self.temperature)
        if self.temperature < 0:
            raise ParameterError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        _finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ParameterError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ParameterError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}", "top_k")
        _finite("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ParameterError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _finite(name, value)
            if not -2.0 <= value <= 2.0:
                raise ParameterError(f"{name} must be in [-2, 2], got {value}", name)
        _finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ParameterError(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParameterError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}", "stop")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ParameterError("stop strings must be non-empty strings", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ParameterError(f"stop strings may be at most {MAX_STOP_CHARS} characters, got "
                                 f"{max(map(len, self.stop))}", "stop")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ParameterError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ParameterError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
                                 "prompt_logprobs")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**64):
            raise ParameterError(f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}", "seed")
        if any(t < 0 for t in self.stop_token_ids):
            raise ParameterError("stop_token_ids must be non-negative token ids", "stop_token_ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ParameterError(f"at most {MAX_STOP_TOKEN_IDS} distinct stop_token_ids, got "
                                 f"{len(self.stop_token_ids)}", "stop_token_ids")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ParameterError(f"min_tokens must be >= 0, got {self.min_tokens!r}", "min_tokens")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        allowed = self.allowed_token_ids or ()
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in allowed):
            raise ParameterError("allowed_token_ids must be non-negative token ids", "allowed_token_ids")
        object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(allowed))))
        bad_words = tuple(tuple(w) for w in (self.bad_words_ids or ()))
        if len(bad_words) > MAX_BAD_WORDS or any(
                not w or len(w) > MAX_BAD_WORD_TOKENS or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                            for t in w) for w in bad_words):
            raise ParameterError(f"bad words: at most {MAX_BAD_WORDS} sequences of 1 to {MAX_BAD_WORD_TOKENS} "
                                 "non-negative token ids", "bad_words")
        object.__setattr__(self, "bad_words_ids", tuple(dict.fromkeys(bad_words)))

    @property
    def greedy(self) -> bool:
        # As vLLM: below 1e-5 the scaled logits overflow (1e-45 turned every probability into NaN), and the
        # distribution is the argmax anyway.
        return self.temperature < MIN_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value!r}", name)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, KV freed, will recompute
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class Request:
    """The mutable state of one sequence as the scheduler sees it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose K/V are in the cache (for this admission; reset on preemption).
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Prefix caching: hashes of full blocks of all_token_ids (content-based, kept across preemptions), how many
    # of this admission's blocks are registered in the cache, and the prompt tokens found cached at admission.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    state_slot: int | None = None  # linear-attention state slot while running
    # Filled during prefill when params.prompt_logprobs is set: one entry per prompt token, None first.
    prompt_logprobs: list | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # params.structured: the xgrammar matcher, advanced by each sampled token (kept across preemptions).
    matcher: Any = None
    # Requests of one prompt sampled n times share a group: the prompt's KV blocks are computed once (Scheduler).
    group: str | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without building the whole list (decode hot path)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class Logprob:
    token_id: int
    logprob: float


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Per generated token: (sampled token logprob, top-n alternatives).
    logprobs: list[tuple[Logprob, list[Logprob]]] | None = None
    # Generated tokens whose text is all in `text` (the rest wait for a character to complete or for a possible
    # stop string to resolve); None: all of them.
    num_text_tokens: int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Per prompt token (None for the first): (its Logprob, top-n alternatives), when asked for.
    prompt_logprobs: list | None = None
    # Timestamps (time.monotonic) for metrics.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (first admission)
    queued_step: int = 0  # the scheduler step at which it was queued (shortest-first admission ages by it)


def validate_request(token_ids: Sequence[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Everything about a request that needs the model's sizes (raise ParameterError)."""
    validate_prompt(token_ids, vocab_size, max_model_len, params.max_tokens)
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise ParameterError(f"stop_token_ids {bad[:4]} are outside the vocabulary [0, {vocab_size})", "stop_token_ids")
    bad = [t for w in params.bad_words_ids for t in w if t >= vocab_size]
    if bad:
        raise ParameterError(f"bad words token ids {bad[:4]} are outside the vocabulary [0, {vocab_size})",
                             "bad_words")
    bad = [t for t in params.allowed_token_ids if t >= vocab_size]
    if bad:
        raise ParameterError(f"allowed_token_ids {bad[:4]} are outside the vocabulary [0, {vocab_size})",
                             "allowed_token_ids")
    bad = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bad:
        raise ParameterError(f"logit_bias token ids {bad[:4]} are outside the vocabulary [0, {vocab_size})",
                             "logit_bias")


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """A dict {token id (int or its decimal string, as OpenAI's JSON keys): bias} or (id, bias) pairs -> sorted
    pairs; ids >= 0, biases finite in [-100, 100], at most MAX_LOGIT_BIAS entries (each costs every step)."""
    items = list(value.items()) if isinstance(value, dict) else list(value or ())
    if len(items) > MAX_LOGIT_BIAS:
        raise ParameterError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(items)}", "logit_bias")
    out = {}
    for key, bias in items:
        try:
            tid = int(key) if not isinstance(key, (bool, float)) else None
        except (TypeError, ValueError):
            tid = None
        if tid is None or tid < 0 or (isinstance(key, str) and key.strip() != str(tid)):
            raise ParameterError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                                 "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
            raise ParameterError(f"logit_bias values must be numbers in [-100, 100], got {bias!r}", "logit_bias")
        out[tid] = float(bias)
    return tuple(sorted(out.items()))


def validate_prompt(token_ids: Sequence[int], vocab_size: int, max_model_len: int, max_tokens: int) -> None:
    """Checks shared by the offline API and the server (raise ParameterError)."""
    if len(token_ids) == 0:
        raise ParameterError("prompt is empty", "prompt")
    if len(token_ids) >= max_model_len:
        raise ParameterError(
            f"prompt has {len(token_ids)} tokens, but the model's context length is {max_model_len} "
            "(the prompt must leave room for at least one generated token)",
            "prompt", "context_length_exceeded",
        )
    if len(token_ids) + max_tokens > max_model_len:
        raise ParameterError(
            f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) = {len(token_ids) + max_tokens} "
            f"exceeds the model's context length {max_model_len}",
            "max_tokens", "context_length_exceeded",
        )
    if not all(type(t) is int for t in token_ids) or min(token_ids) < 0 or max(token_ids) >= vocab_size:
        bad = next(t for t in token_ids if type(t) is not int or not 0 <= t < vocab_size)
        raise ParameterError(f"token id {bad!r} is outside the vocabulary [0, {vocab_size})", "prompt")
