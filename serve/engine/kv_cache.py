"""Paged KV cache: a block allocator (pure Python) and the device tensors.

The cache is split into fixed-size blocks; a request owns a list of block ids
(its block table) and token j of the request lives in slot
`block_ids[j // block_size] * block_size + j % block_size`. Blocks are ref
counted so that a block can later be shared (prefix caching, n > 1 forks).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, block_id: int) -> None:
        if self._refs[block_id] < 1:
            raise ValueError(f"block {block_id} is not allocated")
        self._refs[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            if self._refs[b] < 1:
                raise ValueError(f"double free of block {b}")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)


class StateSlotAllocator:
    """Fixed-size per-sequence state slots (linear-attention layers keep a constant-size state,
    not a growing KV cache). One slot per running request."""

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("no free state slot")
        slot = self._free.popleft()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"state slot {slot} is not allocated")
        self._used.remove(slot)
        self._free.append(slot)


def slots_for(block_ids: Sequence[int], block_size: int, start: int, stop: int) -> list[int]:
    """KV slots of token positions [start, stop) of a request."""
    return [block_ids[j // block_size] * block_size + j % block_size for j in range(start, stop)]


class KVCache:
    """Per-layer K and V tensors: [num_blocks * block_size, num_kv_heads, head_dim] each."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype, device):
        import torch

        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int):
        return self.data[i, 0], self.data[i, 1]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize
