"""n > 1 siblings compute their prompt once: the first sibling prefills it, the others own its full blocks
(ref counted) plus a copy of the block holding the last prompt token's predecessors, and compute only that token.
Outputs equal those of siblings that each prefill the prompt (seeded sampling, ragged prompt lengths around block
edges, chunked prefill, prefix caching on and off); the block counters show the saving; nothing leaks."""

from __future__ import annotations

import random

import pytest

from packserve.engine.engine import LLMEngine, engine_config
from packserve.engine.request import SamplingParams

BLOCK = 16
LENGTHS = [2, 16, 17, 31, 32, 33, 63, 64, 65, 150]


def _engine(model: str, share: bool, **kw) -> LLMEngine:
    return LLMEngine(engine_config(model, device="cpu", dtype="float32", block_size=BLOCK, share_prompt=share,
                                   max_model_len=512, **kw))


def _run(engine: LLMEngine, groups: list[tuple[list[int], int]], max_tokens: int = 6) -> dict[str, list[int]]:
    """Each (prompt, n): n siblings with seeds 100+j at temperature 1 (choice 0 greedy, as a reference row)."""
    out = {}
    for g, (prompt, n) in enumerate(groups):
        for j in range(n):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if j == 0 else 1.0, seed=100 + j,
                                    ignore_eos=True)
            engine.add_request(prompt, params, request_id=f"g{g}-{j}", group=f"g{g}")
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    assert engine.allocator.num_used == 0 and not engine.scheduler.groups
    return out


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return checkpoint_factory("llama", initializer_range=0.15)


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("budget", [8192, 48])  # 48: prompts prefilled in chunks while siblings wait
def test_shared_siblings_equal_separate_prefills(model, prefix_caching, budget):
    rng = random.Random(0)
    groups = [([rng.randrange(3, 500) for _ in range(n_tok)], 1 + k % 4) for k, n_tok in enumerate(LENGTHS)]
    kw = dict(prefix_caching=prefix_caching, max_num_batched_tokens=budget, max_num_seqs=min(budget, 64))
    shared_engine = _engine(model, True, **kw)
    shared = _run(shared_engine, groups)
    separate_engine = _engine(model, False, **kw)
    assert _run(separate_engine, groups) == shared
    expected = sum((n - 1) * (len(p) - 1) for p, n in groups)
    assert shared_engine.scheduler.shared_prompt_tokens == expected > 0
    assert separate_engine.scheduler.shared_prompt_tokens == 0


@pytest.mark.parametrize("length", [199, 200, 208])  # last prompt token mid-block, at a block start, at a block end
def test_block_counters_show_one_prompt(model, length):
    engine = _engine(model, True, prefix_caching=False)
    prompt = list(range(3, 3 + length))
    for j in range(4):
        engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=j, ignore_eos=True),
                           request_id=f"s{j}", group="g")
    engine.step()  # the first sibling prefills; the others wait for it
    assert len(engine.scheduler.running) == 1
    blocks = -(-length // BLOCK)
    assert engine.allocator.num_used == blocks
    engine.step()  # the others share its blocks and compute only the last prompt token
    assert len(engine.scheduler.running) == 4
    full = (length - 1) // BLOCK
    own = -(-length // BLOCK) - full  # per sibling: the block with the last prompt token
    leader_blocks = -(-(length + 1) // BLOCK)  # the first sibling decoded its second token meanwhile
    assert engine.allocator.num_used == leader_blocks + 3 * own  # separately: at least 4 * blocks
    leader = engine.scheduler.requests["s0"]
    for rid in ("s1", "s2", "s3"):
        assert engine.scheduler.requests[rid].block_ids[:full] == leader.block_ids[:full]
        assert engine.scheduler.requests[rid].block_ids[full:] != leader.block_ids[full:]
    engine.abort_request("s0")  # the leader leaves: the shared blocks stay with the others
    assert engine.allocator.num_used == leader_blocks - (leader_blocks - full) + 3 * own
    while engine.has_unfinished():
        engine.step()
    assert engine.allocator.num_used == 0


def test_no_sharing_for_prompt_scoring_or_linear_attention(tmp_path, model):
    from packserve.checkpoints import build_linear_attn_checkpoint

    engine = _engine(model, True)
    prompt = list(range(3, 60))
    for j in range(3):
        engine.add_request(prompt, SamplingParams(max_tokens=2, prompt_logprobs=1, temperature=0.0),
                           request_id=f"p{j}", group="g")
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.shared_prompt_tokens == 0
    lin = LLMEngine(engine_config(str(build_linear_attn_checkpoint(tmp_path / "lin", softmax_attention_layers=[1])),
                                  device="cpu", dtype="float32", block_size=BLOCK))
    outs = _run(lin, [(prompt, 3)])
    assert lin.scheduler.shared_prompt_tokens == 0 and len(outs) == 3
