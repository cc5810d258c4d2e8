"""Engine and paged-attention cases: a driver that adds requests while others decode, and one decode step over
a poisoned paged cache with the torch path's result (the kernel tests and the decode-attention benchmark)."""

from __future__ import annotations


def run_with_arrivals(engine, prompts: list[list[int]], params, every: int, per_arrival: int = 1,
                      max_steps: int = 2000) -> list[list[int]]:
    """Step `engine` until all `prompts` finished, adding `per_arrival` of them every `every` steps (continuous
    batching: prompts join while others decode). Returns each prompt's generated token ids, in prompt order."""
    pending, done, step = list(enumerate(prompts)), {}, 0
    while pending or engine.has_unfinished():
        if step % every == 0:
            for _ in range(per_arrival):
                if pending:
                    i, p = pending.pop(0)
                    engine.add_request(p, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
        assert step < max_steps, "the engine did not finish"
    return [done[i] for i in range(len(prompts))]


def paged_case(lens: list[int], H: int, Hkv: int, D: int, block_size: int, seed: int = 0, dtype=None,
               device="cpu", table_dtype=None):
    """One decode step over a paged cache: (q, k_cache, v_cache, block tables as lists, block table tensor).
    Only the requests' slots are written (random); every other slot is NaN, so a kernel that reads outside a
    context shows. Blocks are shuffled (non-contiguous tables, padded with block 0), and q is a strided view
    (the query rows of a fused QKV output)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // block_size) for n in lens) + 7
    k_cache = torch.full((nblocks * block_size, Hkv, D), float("nan"))
    v_cache = torch.full((nblocks * block_size, Hkv, D), float("nan"))
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, i = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(perm[i:i + nb])
        i += nb
        for j in range(n):
            slot = tables[-1][j // block_size] * block_size + j % block_size
            k_cache[slot] = torch.randn(Hkv, D, generator=g)
            v_cache[slot] = torch.randn(Hkv, D, generator=g)
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=table_dtype or torch.long)
    to = dict(device=device, dtype=dtype or torch.float32)
    # q as the QKV projection leaves it: a strided view of its first H heads (sliced after the move: .to() of a
    # strided slice makes a contiguous copy).
    q = torch.randn(len(lens), H + 2 * Hkv, D, generator=g).to(**to)[:, :H]
    return q, k_cache.to(**to), v_cache.to(**to), tables, table.to(device)


def batch_view(block_ids: list[list[int]], ctx_lens: list[int], q_lens: list[int], block_size: int, device="cpu"):
    """A persistent batch (packserve.engine.input_batch) holding these requests, filled for one step: its view."""
    import torch

    from packserve.engine.input_batch import InputBatch
    from packserve.engine.request import Request, SamplingParams
    from packserve.engine.scheduler import ScheduledRequest

    entries = []
    for i, (blocks, c, n) in enumerate(zip(block_ids, ctx_lens, q_lens)):
        req = Request(f"v{i}", [1] * (c + n), SamplingParams(max_tokens=1))
        req.block_ids = list(blocks)
        entries.append(ScheduledRequest(req, n, c, True))
    width = max(len(b) for b in block_ids)
    batch = InputBatch(len(entries), width, sum(q_lens), block_size, torch.device(device))
    return batch.fill(batch.update(entries), [], [], [])


def gather_decode_meta(table, lens, block_size: int, dtype):
    """The torch paged path's metadata for one decode step (each request's blocks gathered, masked to its length:
    what the decode kernels replace), from the same builder the runner uses."""
    from packserve.layers.paged_attention_layer import build_paged_meta

    lens = [int(n) for n in lens.tolist()]
    view = batch_view(table.long().tolist(), [n - 1 for n in lens], [1] * len(lens), block_size, table.device)
    return build_paged_meta(view, block_size, "torch", table.device, dtype)


def gather_sdpa_decode(q, k_cache, v_cache, table, lens, block_size: int, scale: float):
    """One decode step through the torch paged path (gather + mask + SDPA). NaN slots inside gathered blocks
    would poison it: pass caches without NaN."""
    from packserve.layers.paged_attention_layer import paged_attention

    return paged_attention(q, k_cache, v_cache, gather_decode_meta(table, lens, block_size, q.dtype), scale)
