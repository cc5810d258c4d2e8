"""Workloads: length distributions, synthetic prompts (words / exact tokens), JSONL and ShareGPT files."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from packserve.loadtest.client import build_payload
from packserve.loadtest.workload import LengthDist, PromptBuilder, dataset_requests, load_jsonl, synthetic_requests


@pytest.fixture(scope="module")
def tokenizer():
    from packserve.checkpoints import build_tokenizer

    return build_tokenizer()


def test_length_dist_parse_and_sample():
    rng = np.random.default_rng(0)
    assert LengthDist.parse("32").sample(rng) == 32
    assert LengthDist.parse("fixed:7").describe() == "7"
    u = LengthDist.parse("uniform:4:9")
    xs = [u.sample(rng) for _ in range(2000)]
    assert min(xs) == 4 and max(xs) == 9
    ln = LengthDist.parse("lognormal:128:0.9:8:1024")
    ys = np.array([ln.sample(rng) for _ in range(4000)])
    assert ys.min() >= 8 and ys.max() <= 1024
    assert abs(np.median(ys) - 128) < 12  # median of a lognormal is exp(mu)
    for bad in ("0", "uniform:9:4", "lognormal:10", "poisson:3", "abc"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_synthetic_words_without_tokenizer():
    it = synthetic_requests(LengthDist.parse("uniform:5:40"), LengthDist.parse("16"), seed=3)
    reqs = list(itertools.islice(it, 20))
    assert all(len(r.prompt.split()) == r.prompt_len for r in reqs)
    assert all(r.output_len == 16 for r in reqs)
    again = list(itertools.islice(synthetic_requests(LengthDist.parse("uniform:5:40"), LengthDist.parse("16"), seed=3), 20))
    assert reqs == again  # seeded
    assert len({r.prompt for r in reqs}) == 20  # prompts differ (no accidental prefix-cache hits)


def test_synthetic_exact_token_lengths(tokenizer):
    builder = PromptBuilder(tokenizer)
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 31, 64, 200, 513):
        for _ in range(3):
            prompt = builder.build(n, rng)
            assert len(tokenizer.encode(prompt, add_special_tokens=False)) == n, (n, prompt)
    it = synthetic_requests(LengthDist.parse("lognormal:48:0.8:4:256"), LengthDist.parse("8"), seed=1, tokenizer=tokenizer)
    for r in itertools.islice(it, 25):
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len


def test_synthetic_prompts_leave_room_for_the_bos(tokenizer):
    """With a BOS-adding tokenizer (Llama's) a completions prompt of N tokens is N - 1 tokens of text: the server
    adds the BOS, so it sees N (vLLM's benchmark does the same); prompt_len counts it."""
    from tokenizers import processors

    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()))
    bos = tok.convert_tokens_to_ids("<|begin|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", bos)])
    special = tok.num_special_tokens_to_add()
    assert special == 1
    for prefix_len in (0, 20):
        it = synthetic_requests(LengthDist.parse("uniform:1:65"), LengthDist.parse("8"), seed=4, tokenizer=tok,
                                prefix_len=prefix_len, special_tokens=special)
        for r in itertools.islice(it, 30):
            ids = tok.encode(r.prompt)  # what the server encodes: with the BOS
            assert ids[0] == bos and len(ids) == r.prompt_len, (prefix_len, r)
    one = next(synthetic_requests(LengthDist.parse("1"), LengthDist.parse("8"), tokenizer=tok, special_tokens=1))
    assert len(tok.encode(one.prompt)) == 2 == one.prompt_len  # never an empty prompt
    with pytest.raises(ValueError):
        next(synthetic_requests(LengthDist.parse("4"), LengthDist.parse("8"), special_tokens=-1))


def test_jsonl_plain_and_sharegpt(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    lines = [
        {"prompt": "hello there", "output_len": 5},
        {"conversations": [{"from": "human", "value": "what is packing?"}, {"from": "gpt", "value": "bins"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"other": 1},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n")
    rows = load_jsonl(path)
    assert [r["prompt"] for r in rows] == ["hello there", "what is packing?"]
    reqs = list(itertools.islice(dataset_requests(path, LengthDist.parse("9"), seed=0, tokenizer=tokenizer), 6))
    assert {r.prompt for r in reqs} == {"hello there", "what is packing?"}  # cycles
    assert {(r.prompt, r.output_len) for r in reqs} == {("hello there", 5), ("what is packing?", 9)}
    assert all(r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in reqs)
    (tmp_path / "empty.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ValueError):
        load_jsonl(tmp_path / "empty.jsonl")


def test_payloads():
    from packserve.loadtest.workload import RequestSpec

    spec = RequestSpec("hi there", 12, 2)
    c = build_payload(spec, "completions", "m", ignore_eos=True, include_usage=True)
    assert c == {"model": "m", "prompt": "hi there", "max_tokens": 12, "stream": True, "temperature": 0.0,
                 "ignore_eos": True, "stream_options": {"include_usage": True}}
    ch = build_payload(spec, "chat", "m", ignore_eos=False, include_usage=False, extra={"top_p": 0.5})
    assert ch["messages"] == [{"role": "user", "content": "hi there"}] and "prompt" not in ch
    assert "ignore_eos" not in ch and "stream_options" not in ch and ch["top_p"] == 0.5


def test_synthetic_shared_prefix(tokenizer):
    """--prefix-len: one seeded prefix opens every prompt; the rest differs; counts include it."""
    it = synthetic_requests(LengthDist.parse("uniform:4:12"), LengthDist.parse("8"), seed=2, prefix_len=30)
    reqs = list(itertools.islice(it, 10))
    prefix = " ".join(reqs[0].prompt.split()[:30])
    assert all(r.prompt.startswith(prefix + " ") for r in reqs) and len({r.prompt for r in reqs}) == 10
    assert all(r.prompt_len == len(r.prompt.split()) for r in reqs)
    tok = list(itertools.islice(synthetic_requests(LengthDist.parse("uniform:4:12"), LengthDist.parse("8"), seed=2,
                                                   tokenizer=tokenizer, prefix_len=30), 10))
    assert all(len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len for r in tok)
    heads = {tuple(tokenizer.encode(r.prompt, add_special_tokens=False)[:29]) for r in tok}
    assert len(heads) == 1  # the same leading tokens (the junction token may merge)
    with pytest.raises(ValueError):
        next(synthetic_requests(LengthDist.parse("4"), LengthDist.parse("8"), prefix_len=-1))
