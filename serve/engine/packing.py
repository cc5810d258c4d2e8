"""Bin-packing of prompts into packed rows (pure Python, no model, no tensors).

Prepacking (Zhao et al. 2024): instead of padding every prompt to the longest,
prompts are bin-packed into a few rows of a fixed capacity. Every prompt keeps
its own causal attention block (block-diagonal mask) and its positions restart
at 0. packserve goes one step further: the matmuls run on the flat token list
(no pad tokens at all); rows matter only to attention backends that need a
rectangular layout (sdpa, flex), and `efficiency` measures their wasted slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total <= capacity (FFD)."""
    _check_lengths(lengths, capacity)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Like FFD but each item goes to the fullest bin that still fits it."""
    _check_lengths(lengths, capacity)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        best, best_room = -1, capacity + 1
        for b, room in enumerate(free):
            if lengths[i] <= room < best_room:
                best, best_room = b, room
        if best < 0:
            bins.append([i])
            free.append(capacity - lengths[i])
        else:
            bins[best].append(i)
            free[best] -= lengths[i]
    return bins


ALGORITHMS = {"ffd": first_fit_decreasing, "bfd": best_fit_decreasing}


def _check_lengths(lengths: Sequence[int], capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for n in lengths:
        if n < 1:
            raise ValueError(f"every length must be >= 1, got {n}")
        if n > capacity:
            raise ValueError(f"length {n} exceeds the row capacity {capacity}")


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence goes. Flat order = rows concatenated, in `order`."""

    rows: tuple[tuple[int, ...], ...]  # sequence indices per row, in placement order
    lengths: tuple[int, ...]  # per sequence (input order)
    capacity: int

    @property
    def order(self) -> list[int]:
        return [i for row in self.rows for i in row]

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots computed by a row backend (rows x capacity)."""
        slots = self.num_rows * self.capacity
        return self.num_tokens / slots if slots else 1.0

    @property
    def padding_avoided(self) -> int:
        """Pad tokens a padded batch of the same prompts would have computed."""
        return max(self.lengths, default=0) * len(self.lengths) - self.num_tokens


def pack(lengths: Sequence[int], capacity: int | None = None, algorithm: str = "ffd") -> PackedLayout:
    """Pack sequence lengths into rows; capacity defaults to the longest length."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {algorithm!r}; choose from {sorted(ALGORITHMS)}")
    if not lengths:
        return PackedLayout(rows=(), lengths=(), capacity=capacity or 1)
    longest = max(lengths)
    cap = longest if capacity is None else max(capacity, longest)
    bins = ALGORITHMS[algorithm](lengths, cap)
    return PackedLayout(rows=tuple(tuple(b) for b in bins), lengths=tuple(lengths), capacity=cap)


@dataclass(frozen=True)
class PackedBatch:
    """Flat model inputs for a set of fresh prompts, laid out row by row."""

    layout: PackedLayout
    token_ids: list[int]  # flat, in layout order
    position_ids: list[int]  # restart at 0 for every prompt
    cu_seqlens: list[int]  # [num_seqs + 1], flat offsets in layout order
    row_cu_tokens: list[int]  # [num_rows + 1], flat offsets of each row
    segment_ids: list[int]  # per token: index of its prompt within its row
    last_token_index: list[int]  # per sequence (input order): flat index of its last token
    slot_mapping: list[int]  # per token: KV-cache slot

    @property
    def seq_order(self) -> list[int]:
        return self.layout.order


def build_packed_batch(
    token_lists: Sequence[Sequence[int]],
    slot_lists: Sequence[Sequence[int]] | None = None,
    capacity: int | None = None,
    algorithm: str = "ffd",
) -> PackedBatch:
    """Pack prompts and build the flat inputs. `slot_lists[i][j]` is the KV slot of token j of prompt i."""
    lengths = [len(t) for t in token_lists]
    layout = pack(lengths, capacity, algorithm)
    token_ids: list[int] = []
    positions: list[int] = []
    cu = [0]
    row_cu = [0]
    segments: list[int] = []
    last = [0] * len(lengths)
    slots: list[int] = []
    for row in layout.rows:
        for seg, i in enumerate(row):
            n = lengths[i]
            token_ids.extend(token_lists[i])
            positions.extend(range(n))
            segments.extend([seg] * n)
            if slot_lists is not None:
                if len(slot_lists[i]) != n:
                    raise ValueError(f"sequence {i}: {len(slot_lists[i])} slots for {n} tokens")
                slots.extend(slot_lists[i])
            last[i] = cu[-1] + n - 1
            cu.append(cu[-1] + n)
        row_cu.append(cu[-1])
    return PackedBatch(layout, token_ids, positions, cu, row_cu, segments, last, slots)
