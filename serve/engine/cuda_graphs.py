"""CUDA graphs of the decode step: a step is ~10 kernel launches per layer, so at small batches a GPU waits on the
host launching them; replaying a graph captured once per batch size launches the whole forward at once.

The graphs are captured at start-up (packserve.engine.engine) for batch-size buckets 1, 2, 4, 8, 16, 24, ...
up to the largest decode batch the scheduler may form (vLLM's capture sizes). A step whose every request decodes
(one new token each, no fresh prompt) is padded to the next bucket and replays that graph; a larger one, a mixed
step or a run with `--enforce-eager` runs eagerly. The graphs read the persistent input batch's device buffers
(packserve.engine.input_batch), whose addresses never change while they are in use: the step's inputs are copied
into them (padding rows write to the KV cache's scratch block and attend to it alone) and the graph's output
buffer holds the hidden states. Everything in the forward is a device op with shapes fixed per bucket: the paged
decode kernel runs with its split count chosen for the model's context length, not the step's longest request.

Not captured (eager): models with linear-attention layers (their state slots) and tensor parallelism.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

# The largest batch captured: beyond it a decode step is long enough that launches no longer dominate.
MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then multiples of 8, and the largest decode batch possible."""
    cap = min(max_num_seqs, max_num_batched_tokens, MAX_CAPTURE_SIZE)
    return sorted({s for s in (1, 2, 4, *range(8, cap + 1, 8)) if s <= cap} | {cap})


class DecodeGraphs:
    """One replayable decode forward per bucket. `mode="cuda"` captures CUDA graphs; `mode="eager"` keeps the
    same static-buffer forward as a plain call (CPU tests exercise the padding and buffer handling with it)."""

    def __init__(self, sizes: list[int], mode: str = "cuda"):
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"capture sizes must be distinct, ascending and >= 1: {sizes}")
        if mode not in ("cuda", "eager"):
            raise ValueError(f"mode must be cuda or eager, not {mode!r}")
        self.sizes = sizes
        self.mode = mode
        self._replay: dict[int, Callable[[], torch.Tensor]] = {}
        self._addresses: list[int] = []  # of the buffers the graphs read, at capture
        self.num_replays = 0

    def bucket(self, batch: int) -> int | None:
        """The smallest captured size >= batch, or None (run eagerly)."""
        return next((s for s in self.sizes if s >= batch), None) if self._replay else None

    def capture(self, forward: Callable[[int], torch.Tensor], buffers: list[torch.Tensor]) -> None:
        """forward(B) runs the decode forward on the first B rows of `buffers` (whose contents must already be a
        valid padded step) and returns the hidden states [B, hidden]."""
        self._addresses = [b.data_ptr() for b in buffers]
        if self.mode == "eager":
            self._replay = {B: (lambda B=B: forward(B)) for B in self.sizes}
            return
        pool = None
        with torch.inference_mode():
            for B in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                forward(B)  # compiles the kernels for this shape outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = forward(B)
                pool = graph.pool()
                self._replay[B] = lambda graph=graph, out=out: (graph.replay(), out)[1]
        torch.cuda.synchronize()
        log.info("CUDA graphs captured for decode batches %s", self.sizes)

    def valid(self, buffers: list[torch.Tensor]) -> bool:
        """False once one of the buffers the graphs read (now `buffers`) was reallocated (an oversized
        prefill_logits batch): the graphs are dropped and every step runs eagerly."""
        if [b.data_ptr() for b in buffers] != self._addresses:
            log.warning("decode graphs dropped: the input buffers they read were reallocated")
            self._replay, self._addresses = {}, []
            return False
        return True

    def replay(self, padded: int) -> torch.Tensor:
        """Hidden states [padded, hidden] of the step already written into the buffers."""
        self.num_replays += 1
        return self._replay[padded]()
