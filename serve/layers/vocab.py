"""Vocabulary-parallel embedding and LM head (tensor parallelism, packserve.distributed).

Each rank holds a contiguous slice of the vocabulary's rows (the vocabulary padded up to a multiple of the ranks).
The embedding looks up the ids in its slice, zeroes the others and all-reduces; the LM head computes the logits of
its slice for the rows that are sampled and gathers them on rank 0 only. With one rank both are the plain ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from packserve import distributed
from packserve.layers.linear import ColumnLinear, whole


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.vocab_size, self.tp_rank, self.tp_size = vocab_size, distributed.tp_rank(), distributed.tp_size()
        self.shard = -(-vocab_size // self.tp_size)  # rows per rank (the last rank's padded with zeros)
        self.start = self.tp_rank * self.shard
        self.end = min(vocab_size, self.start + self.shard)  # the real rows of this rank: [start, end)
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden), requires_grad=False)

    def load(self, name: str, tensor, shard: str | None = None) -> None:
        rows = self.end - self.start
        self.weight.data.zero_()
        if rows > 0:
            part = tensor.narrow(0, self.start, rows) if self.tp_size > 1 else whole(tensor)
            self.weight.data[:rows].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        out = F.embedding((ids - self.start) * mine, self.weight)
        return distributed.all_reduce(out.masked_fill_(~mine.unsqueeze(-1), 0.0))


def gather_logits(local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Every rank's [rows, shard] logits -> [rows, vocab_size] on rank 0 (None on the others)."""
    if distributed.tp_size() == 1:
        return local[:, :vocab_size]
    return distributed.gather_columns(local.contiguous(), vocab_size)


class ParallelLMHead(ColumnLinear):
    """The untied LM head split by vocabulary rows like the embedding (the last shard zero-padded)."""

    def __init__(self, hidden: int, vocab_size: int, bias: bool = False):
        size = distributed.tp_size()
        shard = -(-vocab_size // size)
        super().__init__(hidden, shard * size, bias=bias)
        self.start = self.tp_rank * shard
        self.end = min(vocab_size, self.start + shard)

    def load(self, name: str, tensor, shard: str | None = None) -> None:
        rows = self.end - self.start
        param = getattr(self, name)
        param.data.zero_()
        if rows > 0:
            param.data[:rows].copy_(tensor.narrow(0, self.start, rows) if self.tp_size > 1 else whole(tensor))
