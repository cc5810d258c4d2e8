"""Workloads: what each request asks for (prompt, expected lengths).

Two sources, both seeded and both infinite iterators so a duration-bounded run can draw as many
requests as it needs:

- synthetic: prompt and output lengths drawn from a `LengthDist` (fixed, uniform, lognormal). Without a
  tokenizer a prompt of N "tokens" is N words from a fixed vocabulary (an approximation: most BPE
  tokenizers spend 1-2 tokens per such word). With a tokenizer the prompt has exactly N tokens as
  counted by `len(tokenizer.encode(prompt, add_special_tokens=False))`, less the special tokens the
  tokenizer adds to a text (`num_special_tokens_to_add()`, e.g. one BOS) when the endpoint is
  completions, so the server sees N tokens (vLLM's benchmark does the same); a chat template adds more,
  which the server's `usage.prompt_tokens` then reports.
- a JSONL file: one object per line, either `{"prompt": "..."}` (optionally `"output_len": int`) or
  ShareGPT `{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}`
  (the first human turn is the prompt). Lines are shuffled with the seed and cycled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# A fixed vocabulary keeps synthetic prompts reproducible across machines and tokenizer-free.
WORDS: tuple[str, ...] = tuple((
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split())


@dataclass(frozen=True)
class LengthDist:
    """A length distribution: fixed N, uniform [low, high], or lognormal (median, sigma) clipped to [low, high]."""

    kind: str
    value: int = 0  # fixed length, or lognormal median
    low: int = 1
    high: int = 1
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"length distribution kind must be fixed|uniform|lognormal, got {self.kind!r}")
        if self.kind == "fixed" and self.value < 1:
            raise ValueError(f"fixed length must be >= 1, got {self.value}")
        if self.kind in ("uniform", "lognormal") and not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got low={self.low} high={self.high}")
        if self.kind == "lognormal" and (self.value < 1 or self.sigma < 0):
            raise ValueError(f"lognormal needs median >= 1 and sigma >= 0, got {self.value}, {self.sigma}")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """`128` | `fixed:128` | `uniform:64:256` | `lognormal:MEDIAN:SIGMA[:LOW:HIGH]`."""
        parts = str(text).strip().split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", value=int(parts[0]))
            kind, args = parts[0], parts[1:]
            if kind == "fixed" and len(args) == 1:
                return cls("fixed", value=int(args[0]))
            if kind == "uniform" and len(args) == 2:
                return cls("uniform", low=int(args[0]), high=int(args[1]))
            if kind == "lognormal" and len(args) in (2, 4):
                median, sigma = int(args[0]), float(args[1])
                low, high = (int(args[2]), int(args[3])) if len(args) == 4 else (1, max(1, median * 16))
                return cls("lognormal", value=median, sigma=sigma, low=low, high=high)
        except ValueError as exc:
            raise ValueError(f"bad length spec {text!r}: {exc}") from None
        raise ValueError(f"bad length spec {text!r}: use N, uniform:LO:HI or lognormal:MEDIAN:SIGMA[:LO:HI]")

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return int(rng.integers(self.low, self.high + 1))
        n = math.exp(math.log(self.value) + self.sigma * float(rng.standard_normal()))
        return int(min(max(round(n), self.low), self.high))

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.value)
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"lognormal:{self.value}:{self.sigma}:{self.low}:{self.high}"


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. `prompt_len` is our own count (None when unknown); the server's usage wins."""

    prompt: str
    output_len: int
    prompt_len: int | None = None


class PromptBuilder:
    """Makes prompt text of a requested length, in words or (with a tokenizer) in exact tokens."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer
        self._one_token_words: list[str] | None = None

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def build(self, n: int, rng: np.random.Generator) -> str:
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]
        if self.tokenizer is None:
            return " ".join(words)
        return self._exact(n, words, rng)

    def _fillers(self) -> list[str]:
        # Words that add exactly one token when appended; used to top a prompt up to the exact length.
        if self._one_token_words is None:
            base = "a"
            cands = WORDS + tuple("abcdefghijklmnopqrstuvwxyz")
            self._one_token_words = [w for w in cands if self.count(base + " " + w) == self.count(base) + 1]
            if not self._one_token_words:
                self._one_token_words = ["a"]
        return self._one_token_words

    def _exact(self, n: int, words: list[str], rng: np.random.Generator) -> str:
        # n words is usually >= n tokens: cut the ids to n, then repair the cases where decode/encode does
        # not round-trip at the cut by dropping trailing words and topping up with one-token words.
        text = self.tokenizer.decode(self.tokenizer.encode(" ".join(words), add_special_tokens=False)[:n])
        fillers = self._fillers()
        for _ in range(2 * n + 16):
            have = self.count(text)
            if have == n:
                return text
            if have > n:
                if " " in text.strip():
                    text = text.rstrip().rsplit(" ", 1)[0]
                else:
                    text = self.tokenizer.decode(self.tokenizer.encode(text, add_special_tokens=False)[: n])
                    if self.count(text) > n:
                        text = text[:-1]
            else:
                text = f"{text} {fillers[int(rng.integers(0, len(fillers)))]}" if text.strip() else fillers[0]
        raise RuntimeError(f"could not build a prompt of exactly {n} tokens with this tokenizer")


def synthetic_requests(
    input_len: LengthDist, output_len: LengthDist, seed: int = 0, tokenizer: Any | None = None, prefix_len: int = 0,
    special_tokens: int = 0,
) -> Iterator[RequestSpec]:
    """An endless, seeded stream of synthetic requests. With prefix_len, every prompt starts with the same
    prefix of that length (a shared system prompt: what a server's prefix cache is for; vLLM's
    --random-prefix-len), followed by its own part of input_len. special_tokens: how many tokens the server
    adds to each prompt (a BOS): taken off each request's own part (never below one token) and counted in
    prompt_len."""
    if prefix_len < 0 or special_tokens < 0:
        raise ValueError("prefix_len and special_tokens must be >= 0")
    rng = np.random.default_rng(seed)
    builder = PromptBuilder(tokenizer)
    prefix = builder.build(prefix_len, np.random.default_rng([seed, 1])) + " " if prefix_len else ""
    while True:
        n_in, n_out = input_len.sample(rng), output_len.sample(rng)
        n_own = max(1, n_in - special_tokens)
        prompt = prefix + builder.build(n_own, rng)
        n = builder.count(prompt) if tokenizer is not None else prefix_len + n_own  # the junction may merge tokens
        n += special_tokens
        yield RequestSpec(prompt=prompt, output_len=n_out, prompt_len=n)


def _prompt_of(obj: dict) -> str | None:
    if isinstance(obj.get("prompt"), str):
        return obj["prompt"]
    for turn in obj.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user") and isinstance(turn.get("value"), str):
            return turn["value"]
    return None


def load_jsonl(path: str | Path) -> list[dict]:
    """Rows with a usable prompt: {"prompt": str, "output_len": int | None}. Bad lines are skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        prompt = _prompt_of(obj) if isinstance(obj, dict) else None
        if prompt:
            out = obj.get("output_len")
            rows.append({"prompt": prompt, "output_len": int(out) if isinstance(out, int) and out > 0 else None})
    if not rows:
        raise ValueError(f"{path}: no usable prompts (want {{'prompt': ...}} or ShareGPT 'conversations')")
    return rows


def dataset_requests(
    path: str | Path, output_len: LengthDist, seed: int = 0, tokenizer: Any | None = None
) -> Iterator[RequestSpec]:
    """An endless stream over a JSONL file, shuffled once with the seed; lengths from the file or `output_len`."""
    rows = load_jsonl(path)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    builder = PromptBuilder(tokenizer) if tokenizer is not None else None
    while True:
        for i in order:
            row = rows[i]
            n_in = builder.count(row["prompt"]) if builder else None
            yield RequestSpec(row["prompt"], row["output_len"] or output_len.sample(rng), n_in)
