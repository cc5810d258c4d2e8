"""Incremental detokenization, correct across multi-byte characters and BPE merges.

Decoding token by token breaks a character that spans several byte-level
tokens (it shows up as U+FFFD) and can drop the spaces that depend on the
neighbouring token. We decode a small window that starts a few tokens back
(`prefix_offset`) and emit only the text past what the window already produced
(`read_offset`), holding back while the tail is an incomplete character.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    # Each time text is emitted: (generated tokens decoded so far, len(text)); see tokens_within.
    marks_tokens: list[int] = field(default_factory=list)
    marks_chars: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Start the window inside the prompt so the first generated token gets its leading space right.
        tail = self.prompt_token_ids[-5:]
        self.tokens = list(tail)
        self.prefix_offset = 0
        self.read_offset = self._start = len(tail)
        # A fast tokenizer's Rust backend decodes the same text (we never ask for the clean-up pass) without
        # transformers' per-call argument conversion: two decodes per generated token add up in a step.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._backend_decode = getattr(backend, "decode", None)

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly completed text (possibly empty)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            self.text += new
            self._mark()
            return new
        return ""

    def _mark(self) -> None:
        self.marks_tokens.append(self.read_offset - self._start)
        self.marks_chars.append(len(self.text))

    def tokens_within(self, num_chars: int) -> int:
        """How many generated tokens have all their text within the first num_chars characters of `text` (a
        stream sends a token's logprobs only once its text is sent)."""
        k = bisect_right(self.marks_chars, num_chars)
        return self.marks_tokens[k - 1] if k else 0

    def flush(self) -> str:
        """At the end: emit whatever is held back (even an incomplete character)."""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        new = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.tokens)
        self.text += new
        self._mark()
        return new
