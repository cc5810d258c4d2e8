"""Paged KV cache: a block allocator (pure Python) with prefix caching, and the device tensors.

The cache is split into fixed-size blocks; a request owns a list of block ids
(its block table) and token j of the request lives in slot
`block_ids[j // block_size] * block_size + j % block_size`. Blocks are ref
counted: with prefix caching, requests share the blocks of a common prefix.

Prefix caching (as vLLM's automatic prefix caching): a full block whose K/V are
computed is registered under a hash of its tokens chained with the hash of every
block before it (`block_hashes`), so equal hashes mean equal token prefixes. A
new request takes the registered blocks of its longest cached prefix instead of
recomputing them (`match`). A registered block nobody owns stays in the cache,
evictable: `allocate` takes never-used blocks first, then evicts the least
recently released registered block. Evictable blocks count as free.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from typing import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int, start: int, stop: int, prev: bytes = b"") -> list[bytes]:
    """Hashes of full blocks start..stop-1 of a token sequence; prev is the hash of block start-1 (b"" for none).
    A 128-bit BLAKE2b digest of (previous hash, the block's token ids): a collision would alias two different
    prefixes, so the hash is cryptographic rather than Python's 64-bit hash()."""
    out = []
    for i in range(start, stop):
        chunk = token_ids[i * block_size:(i + 1) * block_size]
        prev = hashlib.blake2b(prev + struct.pack(f"<{len(chunk)}q", *chunk), digest_size=16).digest()
        out.append(prev)
    return out


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # never registered (or evicted)
        self._refs = [0] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> registered block
        self._hash_of: dict[int, bytes] = {}  # registered block -> hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unowned; least recently freed first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Registered blocks (owned or evictable)."""
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently freed cached block
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
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
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # -- prefix caching ------------------------------------------------------
    def num_matching(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `hashes` are cached (nothing is taken)."""
        n = 0
        if self.prefix_caching:
            for h in hashes:
                if h not in self._cached:
                    break
                n += 1
        return n

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The registered blocks of the longest prefix of `hashes` (consecutive block hashes from block 0),
        now also owned by the caller (free them like allocated blocks)."""
        out = []
        if not self.prefix_caching:
            return out
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
            out.append(b)
        return out

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (they become plain free blocks). Only with no block owned: after the
        warm-up, so that the server starts with an empty cache."""
        if not self._hash_of:
            return
        if any(self._refs):
            raise RuntimeError("blocks are in use: reset the prefix cache only on an idle engine")
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._hash_of.clear()

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Offer an owned, full, computed block under its hash; no-op when off, when the block is registered
        already, or when another block holds the same content (the first one stays the cached copy)."""
        if not self.prefix_caching or block_id in self._hash_of or block_hash in self._cached:
            return
        if self._refs[block_id] < 1:
            raise ValueError(f"block {block_id} is not allocated")
        self._cached[block_hash] = block_id
        self._hash_of[block_id] = block_hash


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
    """Per-layer K and V tensors: [(num_blocks + 1) * block_size, num_kv_heads, head_dim] each. Blocks
    0..num_blocks-1 are the allocator's; the last one (`scratch_block`) is written and read only by the padding
    rows of a decode step padded to a captured CUDA graph's batch size (packserve.engine.cuda_graphs)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype, device):
        import torch

        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        shape = (num_layers, 2, (num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int):
        return self.data[i, 0], self.data[i, 1]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize
