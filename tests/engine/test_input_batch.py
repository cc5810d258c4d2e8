"""The persistent input batch against a batch rebuilt from scratch: over random steps where requests join, grow,
finish, get preempted (new blocks) and are scheduled in any order, every request's row holds its blocks and
lengths, and the flat inputs (ids, positions, KV slots) equal those computed directly from the requests."""

from __future__ import annotations

import random

import torch

from packserve.engine.input_batch import InputBatch
from packserve.engine.request import Request, SamplingParams
from packserve.engine.scheduler import ScheduledRequest

BS = 4


def _expected(entries, P):
    ids, pos, slots = [], [], []
    for e in entries:
        r, c, n = e.request, e.context_len, e.num_new_tokens
        ids += r.token_slice(c, c + n)
        pos += list(range(c, c + n))
        slots += [r.block_ids[j // BS] * BS + j % BS for j in range(c, c + n)]
    return ids, pos, slots


def test_rows_follow_requests_through_random_steps():
    rng = random.Random(0)
    batch = InputBatch(4, 64, 16, BS, torch.device("cpu"))  # small: rows and token buffers must grow
    live: list[Request] = []
    next_block, uid = 0, 0
    for step in range(300):
        for _ in range(rng.randint(0, 3)):  # arrivals
            uid += 1
            r = Request(f"r{uid}", [rng.randrange(100) for _ in range(rng.randint(1, 20))], SamplingParams())
            live.append(r)
        for r in list(live):
            if rng.random() < 0.08:
                live.remove(r)  # finished
            elif rng.random() < 0.05:
                r.num_preemptions += 1  # preempted: recomputed into new blocks
                r.block_ids = []
        entries = []
        for r in rng.sample(live, k=rng.randint(0, len(live))):  # scheduled, in any order
            r.output_token_ids.append(rng.randrange(100))
            total = r.num_tokens
            ctx = rng.randint(max(1, total - 9), total - 1) if total > 1 else 0
            if ctx == 0:
                continue
            need = -(-total // BS)
            while len(r.block_ids) < need:
                r.block_ids.append(next_block)
                next_block += 1
            entries.append(ScheduledRequest(r, total - ctx, ctx, True))
        prev_rows = {id(q): (k, batch._epoch[k]) for k, q in enumerate(batch.reqs)}
        order = batch.update(entries)
        assert sorted(map(id, order)) == sorted(id(e) for e in entries)
        fresh = [rng.randrange(100) for _ in range(rng.randint(0, 5))]
        view = batch.fill(order, fresh, list(range(len(fresh))), [7] * len(fresh))
        ids, pos, slots = batch.step_inputs()
        want_ids, want_pos, want_slots = _expected(order, len(fresh))
        assert ids.tolist() == fresh + want_ids
        assert pos.tolist() == list(range(len(fresh))) + want_pos
        assert slots.tolist() == [7] * len(fresh) + want_slots
        for k, e in enumerate(order):
            r = e.request
            nb = -(-(e.context_len + e.num_new_tokens) // BS)
            assert view.table[k, :nb].tolist() == r.block_ids[:nb]
            assert (view.ctx_lens[k].item(), view.q_lens[k].item()) == (e.context_len, e.num_new_tokens)
            assert view.seq_lens[k].item() == e.context_len + e.num_new_tokens
        # Rows stay put: a kept row moves only to fill the hole of a removed one (each removal moves at most one).
        kept = {id(r): k for k, r in enumerate(batch.reqs)
                if id(r) in prev_rows and prev_rows[id(r)][1] == r.num_preemptions}
        moved = sum(1 for i, k in kept.items() if prev_rows[i][0] != k)
        assert moved <= len(prev_rows) - len(kept)
