"""Prefix caching: the allocator's cache (hash chain, sharing, LRU eviction), the scheduler's admission from a
cached prefix, and the engine end to end (greedy tokens equal to an engine without the cache, whose tokens
test_generate checks against transformers; across preemption and multi-turn prompts; no block leaks)."""

import random

import pytest

from packserve import LLM, SamplingParams
from packserve.config import SchedulerConfig
from packserve.engine.kv_cache import BlockAllocator, block_hashes
from packserve.engine.request import Request
from packserve.engine.scheduler import Scheduler
from tests.support.scheduler_driver import update

BS = 4


def test_block_hashes_chain_the_whole_prefix():
    a = block_hashes(list(range(10)), BS, 0, 2)
    assert len(a) == 2 and a[0] != a[1]
    assert block_hashes(list(range(10)) + [99], BS, 0, 2) == a  # the partial third block does not count
    other_head = block_hashes([5] + list(range(1, 10)), BS, 0, 2)
    assert other_head[0] != a[0] and other_head[1] != a[1]  # same block-1 tokens, different prefix
    assert block_hashes(list(range(10)), BS, 1, 2, prev=a[0]) == a[1:]  # resumable


def test_match_shares_registered_blocks_and_evictable_blocks_count_as_free():
    al = BlockAllocator(6, BS, prefix_caching=True)
    hs = block_hashes(list(range(12)), BS, 0, 3)
    blocks = al.allocate(3)
    for b, h in zip(blocks, hs):
        al.register(b, h)
    al.free(blocks[::-1])
    assert al.num_free == 6 and al.usage == 0.0 and al.num_cached == 3
    other = block_hashes([1, 2, 3, 4] + list(range(4, 12)), BS, 0, 3)
    assert al.match(other) == []  # first block differs: nothing
    got = al.match(hs[:2] + other[2:])
    assert got == blocks[:2] and al.num_free == 4
    assert al.match(hs) == blocks and al.num_free == 3  # shared: owned twice now
    al.free(got)
    al.free(blocks)
    assert al.num_free == 6


def test_eviction_takes_never_used_blocks_first_then_least_recently_freed():
    al = BlockAllocator(4, BS, prefix_caching=True)
    first = al.allocate(2)
    hs = block_hashes(list(range(8)), BS, 0, 2)
    for b, h in zip(first, hs):
        al.register(b, h)
    al.free(first[::-1])  # tail freed first: evicted first
    fresh = al.allocate(2)
    assert set(fresh).isdisjoint(first) and al.num_cached == 2  # the two never-used blocks
    evicted = al.allocate(1)
    assert evicted == [first[1]] and al.num_cached == 1  # the chain's tail goes first
    assert al.match(hs) == [first[0]]  # the head is still cached
    with pytest.raises(Exception):
        al.allocate(1)


def test_duplicate_content_keeps_the_first_copy_and_off_means_off():
    al = BlockAllocator(4, BS, prefix_caching=True)
    h = block_hashes([1, 2, 3, 4], BS, 0, 1)[0]
    a, b = al.allocate(2)
    al.register(a, h)
    al.register(b, h)
    al.free([a, b])
    assert al.num_cached == 1 and al.match([h]) == [a]
    off = BlockAllocator(4, BS)
    c = off.allocate(1)[0]
    off.register(c, h)
    off.free([c])
    assert off.match([h]) == [] and off.num_cached == 0


def _sched(num_blocks=32, **kw):
    cfg = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 256,
                             "min_cached_fraction": 1 / 3, **kw})
    return Scheduler(cfg, BlockAllocator(num_blocks, BS, prefix_caching=True))


def _req(rid, tokens, max_tokens=3, **kw):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, temperature=0, **kw), eos_token_ids=(0,))


def _finish_all(s, token=7):
    while s.has_unfinished():
        out = s.schedule()
        update(s, out, {e.request.request_id: token for e in out.scheduled if e.sample})


def test_admission_takes_the_cached_prefix_and_computes_the_rest():
    s = _sched()
    s.add_request(_req("a", range(10, 23)))  # 13 tokens: 3 full blocks after prefill
    _finish_all(s)
    assert s.allocator.num_free == 32 and s.allocator.num_cached == 3  # 13 prompt + 2 output tokens computed
    s.add_request(_req("b", list(range(10, 20)) + [5, 6, 7, 8]))  # shares 10 tokens: 2 full blocks
    out = s.schedule()
    (e,) = out.scheduled
    assert (e.context_len, e.num_new_tokens, e.sample) == (8, 6, True)
    b = e.request
    assert b.num_cached_tokens == 8 and (s.prefix_cache_queries, s.prefix_cache_hits) == (13 + 14, 8)
    assert e.slot_mapping(BS)[0] == b.block_ids[2] * BS  # writes start in a block of its own
    _finish_all(s)
    assert s.allocator.num_free == 32


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = _sched()
    s.add_request(_req("a", range(10, 18)))  # 8 tokens = 2 full blocks
    _finish_all(s)
    s.add_request(_req("b", range(10, 18)))
    (e,) = s.schedule().scheduled
    assert (e.context_len, e.num_new_tokens) == (4, 4)  # the last block is recomputed, its logits sampled


def test_a_small_cached_fraction_is_recomputed_in_the_packed_prefill():
    """4 of 20 tokens cached (< min_cached_fraction, a third here): the request is prefilled whole, nothing counted
    as a hit."""
    s = _sched()
    s.add_request(_req("a", range(10, 19)))
    _finish_all(s)
    s.add_request(_req("b", list(range(10, 14)) + list(range(50, 66))))
    (e,) = s.schedule().scheduled
    assert e.context_len == 0 and e.num_new_tokens == 20 and e.request.num_cached_tokens == 0
    assert s.prefix_cache_hits == 0


def test_prefill_logits_keeps_or_evicts_cached_blocks_and_warm_up_empties_the_cache(checkpoint_factory):
    """prefill_logits takes real blocks from the allocator: a cached prefix survives it when blocks are left,
    is evicted (never reused stale) when its blocks are needed; warm_up leaves an empty cache."""
    path = checkpoint_factory("llama")
    _, ps = _prompts()
    llm = LLM(path, num_kv_blocks=64)
    before = llm.generate(ps[:1], GREEDY)[0].outputs[0].token_ids
    cached = llm.engine.allocator.num_cached
    assert cached > 0
    llm.engine.prefill_logits([[5] * 40, [6] * 3])  # 4 blocks: taken from the never-used ones
    assert llm.engine.allocator.num_cached == cached and llm.engine.allocator.num_free == 64
    again = llm.generate(ps[:1], GREEDY)[0]
    assert again.outputs[0].token_ids == before and again.num_cached_tokens > 0
    bs, per = llm.engine.allocator.block_size, llm.engine.max_model_len // llm.engine.allocator.block_size
    every = [[7] * (per * bs)] * (64 // per) + [[7] * (64 % per * bs)]  # every block, prompts within the context
    llm.engine.prefill_logits([p for p in every if p])  # the cached blocks are overwritten, so evicted
    assert llm.engine.allocator.num_cached == 0
    again = llm.generate(ps[:1], GREEDY)[0]
    assert again.outputs[0].token_ids == before and again.num_cached_tokens == 0
    with pytest.raises(ValueError, match="do not fit"):
        llm.engine.prefill_logits([p for p in every if p] + [[7]])
    assert llm.engine.allocator.num_free == 64
    llm.engine.warm_up()
    assert llm.engine.allocator.num_cached == 0
    again = llm.generate(ps[:1], GREEDY)[0]
    assert again.outputs[0].token_ids == before and again.num_cached_tokens == 0


def test_prompt_scoring_requests_compute_every_token():
    s = _sched()
    s.add_request(_req("a", range(10, 22)))
    _finish_all(s)
    s.add_request(_req("b", range(10, 22), prompt_logprobs=0))
    (e,) = s.schedule().scheduled
    assert e.context_len == 0 and e.request.num_cached_tokens == 0


def test_failed_admission_gives_the_cached_prefix_back():
    s = _sched(num_blocks=8)
    s.add_request(_req("a", range(10, 22), max_tokens=1))  # 12 tokens: 3 blocks, cached afterwards
    _finish_all(s)
    s.add_request(_req("hog", range(100, 120), max_tokens=2))  # 20 tokens: the 5 never-used blocks
    run_one = s.schedule()
    update(s, run_one, {"hog": 7})
    s.add_request(_req("b", list(range(10, 22)) + list(range(40, 52)), max_tokens=1))
    out = s.schedule()  # hog's next token evicts a's tail block; b matches 2 blocks but needs 4 more: refused
    assert [e.request.request_id for e in out.scheduled] == ["hog"]
    b = s.requests["b"]
    assert b.block_ids == [] and b.num_computed_tokens == 0 and s.prefix_cache_hits == 0
    # evictable again: a's first two blocks; hog's 5 full blocks are registered too (owned)
    assert s.allocator.num_free == 2 and s.allocator.num_cached == 2 + 5
    update(s, out, {"hog": 7})
    _finish_all(s)
    assert s.allocator.num_free == 8 and not s.has_unfinished()


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _prompts():
    import random

    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(60)]  # a shared "system prompt" of 3+ blocks
    return system, [system + [rng.randrange(3, 500) for _ in range(n)] for n in (1, 9, 16, 30)]


def test_the_cached_fraction_bound_depends_on_the_device_and_can_be_set(checkpoint_factory):
    """Every hit is used where the paged path reads cached blocks in place (the Triton kernel, the C prefill
    operator); the gather + SDPA paths use a cached prefix only when it covers a third of the prompt. Either way
    the greedy tokens are the same."""
    from packserve.engine.scheduler import min_cached_fraction
    from packserve.kernels import cpu_ops

    assert min_cached_fraction(True) == 0.0 and min_cached_fraction(False) == pytest.approx(1 / 3)
    path = checkpoint_factory("llama")
    rng = random.Random(3)
    prefix = [rng.randrange(3, 500) for _ in range(32)]  # 2 blocks of 16
    prompt = prefix + [rng.randrange(3, 500) for _ in range(100)]  # the prefix is a quarter of it
    outs = {}
    for fraction in (1 / 3, 0.0):
        llm = LLM(path, min_cached_fraction=fraction)
        llm.generate([prefix + [7]], GREEDY)  # caches the prefix's two blocks
        outs[fraction] = llm.generate([prompt], GREEDY)[0]
    assert outs[1 / 3].num_cached_tokens == 0 and outs[0.0].num_cached_tokens == 32
    assert outs[1 / 3].outputs[0].token_ids == outs[0.0].outputs[0].token_ids
    engine = LLM(path).engine
    assert engine.scheduler_config.min_cached_fraction is None  # not configured: the attention path decides
    assert engine.runner.reads_cached_blocks_in_place == cpu_ops.has_varlen()
    assert engine.scheduler.min_cached_fraction == (0.0 if cpu_ops.has_varlen() else pytest.approx(1 / 3))


def test_engine_greedy_outputs_equal_with_and_without_the_cache(checkpoint_factory):
    path = checkpoint_factory("llama")
    system, ps = _prompts()
    plain = LLM(path, prefix_caching=False)
    cached = LLM(path)
    want = [o.outputs[0].token_ids for o in plain.generate(ps, GREEDY)]
    first = cached.generate(ps[:1], GREEDY)
    rest = cached.generate(ps[1:], GREEDY)  # all four share the system prompt with the first
    assert [o.outputs[0].token_ids for o in first + rest] == want
    stats = cached.engine.stats
    assert stats.prefix_cache_hits >= 3 * 48
    assert all(o.num_cached_tokens >= 48 for o in rest) and first[0].num_cached_tokens == 0
    assert cached.engine.allocator.num_free == cached.engine.allocator.num_blocks  # nothing leaked
    assert plain.engine.stats.prefix_cache_hits == 0


def test_engine_multi_turn_and_preemption_with_the_cache(checkpoint_factory):
    """Turn 2's prompt is turn 1's prompt + answer + a follow-up: the answer's full blocks are cached too. A
    small cache forces preemption and eviction on the way; tokens still equal the cache-free engine's."""
    path = checkpoint_factory("llama")
    system, ps = _prompts()
    plain = LLM(path, prefix_caching=False)
    cached = LLM(path, num_kv_blocks=14)
    turn1 = cached.generate(ps, GREEDY)
    assert [o.outputs[0].token_ids for o in turn1] == [o.outputs[0].token_ids for o in plain.generate(ps, GREEDY)]
    turn2 = [p + o.outputs[0].token_ids + [7, 8, 9] for p, o in zip(ps, turn1)]
    hits = cached.engine.stats.prefix_cache_hits
    got = [o.outputs[0].token_ids for o in cached.generate(turn2, GREEDY)]
    assert got == [o.outputs[0].token_ids for o in plain.generate(turn2, GREEDY)]
    assert cached.engine.stats.prefix_cache_hits > hits
    assert cached.engine.stats.num_preemptions > 0
    assert cached.engine.allocator.num_free == cached.engine.allocator.num_blocks


def test_warm_up_decodes_too_and_leaves_nothing_behind(checkpoint_factory, monkeypatch):
    """warm_up runs a prefill and then decode steps (the decode path is warm before traffic); afterwards the
    engine is idle, every block free, nothing cached and every counter zero."""
    import packserve.layers.paged_attention_layer as paged

    llm = LLM(checkpoint_factory("llama"))
    calls = []
    real = paged.build_paged_meta
    monkeypatch.setattr(paged, "build_paged_meta", lambda *a, **k: calls.append(a[0].q_host.tolist()) or real(*a, **k))
    llm.engine.warm_up()
    assert any(q and all(n == 1 for n in q) for q in calls)  # a step where every request decoded
    e = llm.engine
    assert not e.has_unfinished() and e.allocator.num_used == 0 and e.allocator.num_cached == 0
    assert e.stats.steps == e.stats.generation_tokens == e.stats.prompt_tokens == 0
    assert e.scheduler.prefix_cache_queries == e.scheduler.num_preemptions == 0
