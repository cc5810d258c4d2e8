"""The persistent input batch: step inputs kept in fixed buffers between steps (vLLM v1's design).

Every request with cached context (decodes, chunk continuations, prompts behind a prefix hit) keeps a row while it
runs: its block-table row is written once and extended by the blocks it gains; a finished or preempted request's
row is refilled by the last row. Per step the rows' cached and new token counts are set, the flat token ids,
positions and KV slots of the whole step are written into host buffers (pinned on CUDA), and each buffer goes to
the device in asynchronous copies of its contiguous rows (on CPU the host buffers are used as they are). `tests/engine/test_input_batch.py` checks
the rows against a batch rebuilt from scratch after additions, finishes, preemptions and reorderings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


# A padding row's cached, new and total token counts and first flat token (unused), as a column.
_PADDING_ROW = np.array([[0], [1], [1], [0]])


@dataclass
class BatchView:
    """One step's rows, as the paged attention metadata builder reads them."""

    num_rows: int
    table: torch.Tensor  # int64 [rows, max_blocks] on the device (rows past a request's blocks hold stale ids)
    seq_lens: torch.Tensor  # int64 [rows]: cached + new tokens, on the device
    ctx_lens: torch.Tensor  # int64 [rows], on the device
    q_lens: torch.Tensor
    q_start: torch.Tensor  # int64 [rows]: each row's first token in the step's paged segment
    ctx_host: np.ndarray  # the same, on the host
    q_host: np.ndarray
    table_host: torch.Tensor  # int64 [rows, max_blocks] on the host


class InputBatch:
    def __init__(self, max_rows: int, max_blocks: int, max_tokens: int, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.max_blocks = max_blocks
        self._alloc_rows(max_rows)
        self._alloc_tokens(max_tokens)
        self.num_tokens = 0
        self.reqs: list = []  # row -> Request
        self._epoch: list[int] = []  # the request's preemption count when its row was written
        self._written: list[int] = []  # blocks written into the row
        self._row: dict[int, int] = {}  # id(Request) -> row
        # The last step's host-to-device copies from the pinned buffers: they run asynchronously, so the host
        # waits for them before it writes the buffers again (a step that samples nothing never syncs otherwise).
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def _buf(self, *shape) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.int64, pin_memory=self.device.type == "cuda")

    def _mirror(self, host: torch.Tensor) -> torch.Tensor:
        return host if self.device.type == "cpu" else torch.empty_like(host, device=self.device)

    def _alloc_rows(self, rows: int) -> None:
        """Per row: the block table, and cached / new / total tokens and first flat token (kept rows copied)."""
        table, per_row = self._buf(rows, self.max_blocks), self._buf(4, rows)
        if hasattr(self, "table"):
            table[:self.table.shape[0]] = self.table
        self.table, self.rows_i64 = table, per_row
        self._table, self._rows = table.numpy(), per_row.numpy()
        self.table_dev, self.rows_dev = self._mirror(table), self._mirror(per_row)

    def _alloc_tokens(self, tokens: int) -> None:
        """Per flat token of a step: token id, position, KV slot."""
        self.tokens = self._buf(3, tokens)
        self._tokens = self.tokens.numpy()
        self.tokens_dev = self._mirror(self.tokens)

    def _wait_copies(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # recorded after the last step's copies: done long since, as a rule

    # -- rows -----------------------------------------------------------------
    def _remove(self, row: int) -> None:
        last = len(self.reqs) - 1
        del self._row[id(self.reqs[row])]
        if row != last:  # the last row fills the hole: its used blocks move, nothing else
            req, n = self.reqs[last], self._written[last]
            self._table[row, :n] = self._table[last, :n]
            self.reqs[row], self._epoch[row], self._written[row] = req, self._epoch[last], n
            self._row[id(req)] = row
        self.reqs.pop()
        self._epoch.pop()
        self._written.pop()

    def update(self, entries: list) -> list:
        """Rows for the step's scheduled requests with cached context (ScheduledRequest entries); returns the
        entries in row order, the order of the step's paged segment."""
        self._wait_copies()  # the rows below rewrite the pinned block table
        wanted = {id(e.request): e for e in entries}
        row = 0
        while row < len(self.reqs):
            req = self.reqs[row]
            if id(req) not in wanted or self._epoch[row] != req.num_preemptions:
                self._remove(row)  # finished, preempted or back to prefill: the last row moves here
            else:
                row += 1
        for e in entries:
            if id(e.request) not in self._row:
                self._row[id(e.request)] = len(self.reqs)
                self.reqs.append(e.request)
                self._epoch.append(e.request.num_preemptions)
                self._written.append(0)
        if len(self.reqs) > self._table.shape[0]:  # more rows than max_num_seqs (prefill_logits callers)
            self._alloc_rows(2 * len(self.reqs))
        order = [wanted[id(r)] for r in self.reqs]
        for row, e in enumerate(order):
            blocks, w = e.request.block_ids, self._written[row]
            if len(blocks) > w:  # the blocks it gained since the last step
                self._table[row, w:len(blocks)] = blocks[w:]
                self._written[row] = len(blocks)
        return order

    # -- one step's inputs --------------------------------------------------------
    def fill(self, order: list, fresh_ids: list[int], fresh_positions: list[int], fresh_slots: list[int],
             pad_to: int = 0, scratch_block: int = 0) -> BatchView:
        """Write the step's flat inputs: the packed fresh prompts first (from the packing), then every row's new
        tokens in row order; copy each buffer to the device once. A decode step replayed by a CUDA graph captured
        for `pad_to` rows gets padding rows after its own: one token each (id 0, position 0) whose K/V go to
        slot 0 of `scratch_block` and which attends to that slot alone."""
        self._wait_copies()
        n, P = len(order), len(fresh_ids)
        ctx, q, seq, start = self._rows[0, :n], self._rows[1, :n], self._rows[2, :n], self._rows[3, :n]
        ctx[:] = [e.context_len for e in order]
        q[:] = [e.num_new_tokens for e in order]
        seq[:] = ctx + q
        start[:] = np.cumsum(q) - q
        T = P + int(q.sum())
        if T > self._tokens.shape[1]:  # prefill_logits may pack more than a step's budget
            self._alloc_tokens(T)
        ids, pos, slots = self._tokens[0], self._tokens[1], self._tokens[2]
        ids[:P], pos[:P], slots[:P] = fresh_ids, fresh_positions, fresh_slots
        if n:
            ids[P:T] = [t for e in order for t in e.request.token_slice(e.context_len, e.context_len + e.num_new_tokens)]
            row_of = np.repeat(np.arange(n), q)
            p = ctx[row_of] + np.arange(T - P) - start[row_of]
            pos[P:T] = p
            bs = self.block_size
            slots[P:T] = self._table[row_of, p // bs] * bs + p % bs
        padded = max(n, pad_to)
        if padded > n:
            assert P == 0 and T == n, "only a decode step (one token per row, no fresh prompt) is padded"
            self._rows[:, n:padded] = _PADDING_ROW
            self._table[n:padded, 0] = scratch_block
            ids[n:padded], pos[n:padded], slots[n:padded] = 0, 0, scratch_block * self.block_size
            T = padded
        if self.device.type != "cpu":
            # Contiguous pieces only: a strided slice of a pinned buffer is staged through pageable memory (a
            # synchronous copy), so the per-token and per-row buffers go one row at a time.
            for k in range(3):
                self.tokens_dev[k, :T].copy_(self.tokens[k, :T], non_blocking=True)
            for k in range(4):
                self.rows_dev[k, :padded].copy_(self.rows_i64[k, :padded], non_blocking=True)
            if padded:
                self.table_dev[:padded].copy_(self.table[:padded], non_blocking=True)
            self._copied.record()
        self.num_tokens = T
        return BatchView(n, self.table_dev[:n], self.rows_dev[2, :n], self.rows_dev[0, :n], self.rows_dev[1, :n],
                         self.rows_dev[3, :n], ctx, q, self.table[:n])

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, positions and KV slots of the last filled step, on the device."""
        T = self.num_tokens
        return self.tokens_dev[0, :T], self.tokens_dev[1, :T], self.tokens_dev[2, :T]
