"""Constrained decoding in the engine: a constrained request preempted and recomputed mid-way keeps its matcher
(same output as without preemption), constrained and free rows share steps, and the matcher ends a request once
its output is complete even under ignore_eos."""

import json

import jsonschema
import pytest

from packserve import LLM, SamplingParams
from packserve.engine.request import GuidedSpec, ParameterError

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                                           "words": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                     "minItems": 2, "maxItems": 4}},
          "required": ["id", "words"], "additionalProperties": False}


def _params(**kw):
    return SamplingParams(max_tokens=80, temperature=0, structured=GuidedSpec("json_schema", json.dumps(SCHEMA)),
                          **kw)


def test_preempted_constrained_requests_resume_their_matchers(checkpoint_factory):
    path = checkpoint_factory("llama")
    prompts = [[5 + i] * (20 + 7 * i) for i in range(6)]
    roomy = LLM(path, device="cpu").generate(prompts, _params())
    tight = LLM(path, device="cpu", num_kv_blocks=20, block_size=8)  # 160 slots for 6 growing requests
    got = tight.generate(prompts, _params())
    assert tight.engine.scheduler.num_preemptions > 0
    for a, b in zip(got, roomy):
        jsonschema.validate(json.loads(a.outputs[0].text), SCHEMA)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_constrained_and_free_rows_in_one_step_and_ignore_eos(checkpoint_factory):
    llm = LLM(checkpoint_factory("llama"), device="cpu")
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want_free = llm.generate([[7, 8, 9]], free)[0].outputs[0].token_ids
    outs = llm.generate([[7, 8, 9], [7, 8, 9]], [free, _params(ignore_eos=True)])
    assert outs[0].outputs[0].token_ids == want_free  # the mask of one row never touches another
    jsonschema.validate(json.loads(outs[1].outputs[0].text), SCHEMA)
    assert outs[1].outputs[0].finish_reason == "stop"  # complete output ends it, ignore_eos or not


def test_a_grammar_that_does_not_compile_is_refused_before_queueing(checkpoint_factory):
    llm = LLM(checkpoint_factory("llama"), device="cpu")
    with pytest.raises(ParameterError) as e:
        llm.generate([[1, 2]], SamplingParams(structured=GuidedSpec("regex", "(", "guided_regex")))
    assert e.value.param == "guided_regex" and not llm.engine.has_unfinished()
