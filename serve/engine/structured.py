"""Structured outputs: constrained decoding with xgrammar (the grammar engine vLLM and SGLang use).

A request's `SamplingParams.structured` (a `GuidedSpec`: a JSON schema, any JSON object, a regex, a choice of
strings, an EBNF grammar in xgrammar's GBNF dialect, or a structural tag) is compiled once per distinct spec (an LRU
cache bounded by entries and bytes), and each request gets its own matcher. Specs over the size, nesting and
repetition limits (packserve.engine.grammar_limits) are refused before they compile; the server compiles in child
processes killed past a timeout (packserve.engine.grammar_process). Every step, the sampler fills the next-token bitmask
of all constrained rows and applies it to their logits in one op, then advances each matcher by the sampled
token; a matcher that has accepted a complete output ends its request (finish_reason "stop"), also under
ignore_eos. The matcher lives on the request, so a preempted request resumes where it was (its generated tokens
are recomputed, not re-sampled). Logprobs stay those of the model's raw distribution.

The API compiles in a worker thread before it queues a request (`compile` is thread-safe), so a slow schema
never stalls the engine loop; the engine thread then finds the grammar in the cache.

A structural tag (tool calls, packserve.api.tool_calls) holds free text and JSON arguments: there, tokens with
control characters other than newlines are masked, and JSON whitespace is at most one character in a row.

JSON is generated compact (no free whitespace: a model, especially a small one, may otherwise loop on spaces),
and without raw control characters: xgrammar's JSON strings admit bytes 0x00-0x1f other than \\r and \\n, which
JSON forbids unescaped (Python's json.loads and the OpenAI SDK reject them), so tokens holding one are masked for
JSON constraints.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Any

import torch

from packserve.engine.grammar_limits import check_spec
from packserve.engine.grammar_process import CompileProcess, compile_spec
from packserve.engine.request import GuidedSpec
from packserve.kernels import cpu_ops

CACHE_SIZE = 256  # compiled grammars kept (distinct specs), and at most CACHE_BYTES of them
CACHE_BYTES = 512 * 2**20  # (a 50,000-string enum compiles to ~350 MB: counting entries alone bounds nothing)
COMPILE_PROCESSES = 2  # child processes compiling at once (compile_timeout set: the server)


def mask_logits_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
    """Pure torch: -inf where a row's bit is 0 (the reference of the CPU operator)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[rows].unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :vocab_size].to(logits.device)
    logits[rows, :vocab_size] = logits[rows, :vocab_size].masked_fill(allowed == 0, float("-inf"))


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
    """Apply the step's bitmask to the constrained rows, in place: packserve's CPU operator (~0.1 ms for 32 rows
    of a 32k vocabulary, where xgrammar's CPU path took 4.3 ms and the torch reference 1.1 ms), xgrammar's kernel
    on CUDA, else the torch reference."""
    if logits.is_cuda:
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab_size, indices=rows)
    elif cpu_ops.usable(logits) and logits.shape[1] <= bitmask.shape[1] * 32:
        cpu_ops.apply_token_bitmask_(logits, bitmask, torch.tensor(rows, dtype=torch.int64))
    else:
        mask_logits_ref(logits, bitmask, rows, vocab_size)


class StructuredOutputs:
    """The compiler for one tokenizer and vocabulary size, with a cache of compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], fill_threads: int = 1,
                 compile_timeout: float | None = None):
        """compile_timeout: compile in child processes (packserve.engine.grammar_process), each compile killed
        past that many seconds (the server); None: in the calling thread (offline use)."""
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # xgrammar's own cache off: ours is the one bounded by memory.
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        # The bitmask words of JSON constraints: every token but those with a raw control character; of structural
        # tags (tool calls: text and JSON arguments), the same but newlines allowed.
        self.json_words = xgr.allocate_token_bitmask(1, vocab_size)[0]
        self.text_words = xgr.allocate_token_bitmask(1, vocab_size)[0]
        for tid, piece in enumerate(info.decoded_vocab):
            if tid not in stop_token_ids and any(b < 0x20 for b in piece):
                self.json_words[tid // 32] &= ~(1 << (tid % 32))
                if any(b < 0x20 and b != 0x0A for b in piece):
                    self.text_words[tid // 32] &= ~(1 << (tid % 32))
        self._cache: OrderedDict[GuidedSpec, Any] = OrderedDict()
        self._cache_bytes = 0
        self._pool = None if compile_timeout is None else _ProcessPool(info, compile_timeout, COMPILE_PROCESSES)
        # Threads filling the bitmasks: 1 on CPU, where torch's threads hold every core between steps (2 threads
        # took 1.2 ms per step for 32 rows there, 1 thread 0.1 ms); more on a GPU host, whose cores are idle.
        self.fill_threads = fill_threads
        self._batch = None  # xgrammar's BatchGrammarMatcher (a thread pool), made on first use
        self._lock = threading.Lock()

    def is_compiled(self, spec: GuidedSpec) -> bool:
        with self._lock:
            return spec in self._cache

    def compile(self, spec: GuidedSpec):
        """The compiled grammar (cached); ParameterError naming the field when it does not compile."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        check_spec(spec)
        compiled = self._pool.compile(spec) if self._pool is not None else compile_spec(self.compiler, spec)
        with self._lock:
            self._cache[spec] = compiled
            self._cache_bytes += compiled.memory_size_bytes
            while len(self._cache) > 1 and (len(self._cache) > CACHE_SIZE or self._cache_bytes > CACHE_BYTES):
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.memory_size_bytes
        return compiled

    def matcher(self, spec: GuidedSpec):
        return self.xgr.GrammarMatcher(self.compile(spec))

    def apply(self, logits, rows: list[int], requests: list) -> None:
        """Mask each constrained row of logits (rows index `requests`, the step's sampled requests) to what its
        matcher allows next: the bitmasks filled in parallel threads, applied in one op."""
        if self._batch is None:
            self._batch = self.xgr.BatchGrammarMatcher(max_threads=self.fill_threads)
        bitmask = self.xgr.allocate_token_bitmask(len(requests), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([requests[i].matcher for i in rows], bitmask, indices=rows)
        kinds = [requests[i].params.structured.kind for i in rows]
        json_rows = [i for i, k in zip(rows, kinds) if k in ("json_schema", "json_object")]
        if json_rows:
            bitmask[json_rows] &= self.json_words
        tag_rows = [i for i, k in zip(rows, kinds) if k == "structural_tag"]
        if tag_rows:
            bitmask[tag_rows] &= self.text_words
        mask_logits(logits, bitmask, rows, self.vocab_size)

    def accept(self, matchers: list, tokens: list[int]) -> None:
        self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)


class _ProcessPool:
    """`size` compile processes; a compile takes the most recently freed one. The first child starts with the
    pool, the others when compiles overlap (each child holds ~300 MB: a server whose grammars come one at a
    time runs one)."""

    def __init__(self, info, timeout: float, size: int):
        self.procs = [CompileProcess(info, timeout, start_now=(i == size - 1)) for i in range(size)]
        self._free: queue.LifoQueue = queue.LifoQueue()
        for proc in self.procs:  # the started one last: taken first
            self._free.put(proc)

    def compile(self, spec: GuidedSpec):
        proc = self._free.get()
        try:
            return proc.compile(spec)
        finally:
            self._free.put(proc)
