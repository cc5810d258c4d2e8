"""Prompt logprobs (echo + logprobs scoring) == transformers' full forward, under packing, chunking, preemption."""

import pytest
import torch

from packserve import LLM, SamplingParams
from packserve.engine.request import ParameterError

LENGTHS = [1, 2, 15, 64, 65, 130, 7]


def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(5, 500, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(checkpoint_factory):
    from transformers import AutoModelForCausalLM

    path = checkpoint_factory("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for p in prompts():
            lp = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1)  # position j predicts token j+1
            refs.append(lp)
    return path, refs


@pytest.mark.parametrize("opts", [{}, {"max_num_batched_tokens": 40, "max_num_seqs": 3},
                                  {"num_kv_blocks": 11, "max_num_seqs": 4}], ids=["packed", "chunked", "preempted"])
def test_prompt_logprobs_match_transformers(reference, opts):
    path, refs = reference
    llm = LLM(path, **opts)
    outs = llm.generate(prompts(), SamplingParams(max_tokens=24, temperature=0, prompt_logprobs=2, ignore_eos=True))
    for p, o, ref in zip(prompts(), outs, refs):
        pl = o.prompt_logprobs
        assert len(pl) == len(p) and pl[0] is None
        for j in range(1, len(p)):
            chosen, top = pl[j]
            assert chosen.token_id == p[j]
            assert chosen.logprob == pytest.approx(float(ref[j - 1, p[j]]), abs=2e-4)
            assert [t.token_id for t in top] == ref[j - 1].topk(2).indices.tolist()
        assert len(o.outputs[0].token_ids) == 24
    assert llm.engine.allocator.num_used == 0
    if "num_kv_blocks" in opts:
        assert llm.engine.scheduler.num_preemptions > 0


def test_max_tokens_zero_scores_without_generating(reference):
    path, refs = reference
    llm = LLM(path)
    outs = llm.generate(prompts(), SamplingParams(max_tokens=0, prompt_logprobs=0, logprobs=2))
    for p, o, ref in zip(prompts(), outs, refs):
        assert o.finished and o.outputs[0].token_ids == [] and o.outputs[0].text == ""
        assert o.outputs[0].logprobs == []
        assert o.outputs[0].finish_reason == "length"
        total = sum(e[0].logprob for e in o.prompt_logprobs[1:])
        want = sum(float(ref[j - 1, p[j]]) for j in range(1, len(p)))
        assert total == pytest.approx(want, abs=1e-3)
    assert llm.engine.allocator.num_used == 0
    with pytest.raises(ParameterError, match="max_tokens"):
        SamplingParams(max_tokens=0)
