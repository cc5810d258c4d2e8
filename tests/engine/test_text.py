"""Text in and out: bad input, incremental detokenization, stop strings, logprobs."""

import random

import pytest
import torch

from packserve import LLM, SamplingParams
from packserve.checkpoints import build_tokenizer
from packserve.engine.detokenizer import IncrementalDetokenizer
from packserve.engine.request import ParameterError
from packserve.engine.stop import StopMatcher


@pytest.fixture(scope="module")
def llm(checkpoint_factory):
    return LLM(checkpoint_factory("llama"), max_model_len=256)


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=50), "logprobs"),
    (dict(stop=["x"] * 17), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(seed=2**64), "seed"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_sampling_params_name_the_field(kwargs, param):
    with pytest.raises(ParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_bad_prompts_rejected_without_side_effects(llm):
    engine = llm.engine
    good = SamplingParams(max_tokens=4, temperature=0)
    ok_before = llm.generate(["Hello world"], good)[0].outputs[0].token_ids
    with pytest.raises(ParameterError, match="empty") as e:
        llm.generate([""], good)
    assert e.value.param == "prompt"
    with pytest.raises(ParameterError, match="300.*256") as e:
        llm.generate([[5] * 300], good)
    with pytest.raises(ParameterError, match="max_tokens") as e:
        llm.generate([[5] * 200], SamplingParams(max_tokens=100))
    assert e.value.param == "max_tokens"
    with pytest.raises(ParameterError, match="vocabulary"):
        llm.generate([[5, 10**6]], good)
    with pytest.raises(ParameterError, match="stop_token_ids") as e:
        llm.generate(["hi"], SamplingParams(max_tokens=4, stop_token_ids=[10**6], min_tokens=2))
    assert e.value.param == "stop_token_ids"
    # A bad prompt in a list queues nothing.
    with pytest.raises(ParameterError):
        llm.generate(["fine", ""], good)
    assert not engine.has_unfinished() and engine.allocator.num_used == 0
    assert llm.generate(["Hello world"], good)[0].outputs[0].token_ids == ok_before


def test_incremental_detokenizer_matches_full_decode():
    tok = build_tokenizer()
    text = "Unicode: café, naïve, 日本語 🙂🚀 and spaces  here.\nNew line"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Hi", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt)
    pieces = [d.add(t) for t in ids]
    d.flush()
    assert "".join(pieces) + "" == d.text == text
    assert all("\ufffd" not in p for p in pieces), "never emits half a character"
    # Multi-byte characters really span several tokens here, so the test can fail.
    assert any(p == "" for p in pieces)

    class DecodeOnly:  # a tokenizer without a Rust backend: the transformers decode() path
        decode = tok.decode

    slow = IncrementalDetokenizer(DecodeOnly(), prompt)
    assert slow._backend_decode is None
    assert [slow.add(t) for t in ids] == pieces


def _naive_stop(text: str, stops) -> tuple[int, str] | None:
    """The first end position where a stop string ends; there, the longest one."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return end - len(s), s
    return None


def _naive_holdback(text: str, stops) -> int:
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


@pytest.mark.parametrize("seed", range(40))
def test_stop_matcher_matches_a_naive_scan_fed_in_random_pieces(seed):
    """Random texts over a small alphabet (many partial matches, overlapping and nested stop strings), fed as the
    detokenizer grows it: the first stop found and the holdback after every piece agree with a naive rescan."""
    rng = random.Random(seed)
    stops = tuple({"".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 5))})
    text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 60)))
    m, fed, got = StopMatcher(stops), 0, None
    while fed < len(text) and got is None:
        fed = min(len(text), fed + rng.randint(1, 4))
        got = m.feed(text[:fed])
        if got is None:
            assert m.holdback == _naive_holdback(text[:fed], stops)
    assert got == _naive_stop(text[:fed], stops)
    if got is None:
        assert _naive_stop(text, stops) is None


def test_stop_matcher_reads_each_character_once():
    m = StopMatcher(("x" * 1024, "y" * 1000 + "z"))
    text = ""
    for _ in range(3000):
        text += "y"
        assert m.feed(text) is None and m.consumed == len(text)
    assert m.holdback == 1000
    assert m.feed(text + "z") == (len(text) - 1000, "y" * 1000 + "z")


def test_stop_strings_truncate_and_finish(llm):
    base = llm.generate(["The quick brown"], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(["The quick brown"], SamplingParams(max_tokens=40, temperature=0, stop=[stop],
                                                           ignore_eos=True))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[:text.index(stop)]
    keep = llm.generate(["The quick brown"], SamplingParams(max_tokens=40, temperature=0, stop=[stop],
                                                            include_stop_str_in_output=True, ignore_eos=True))[0]
    assert keep.outputs[0].text == text[:text.index(stop) + len(stop)]
    assert llm.engine.allocator.num_used == 0


def test_stop_token_ids_and_eos(llm):
    base = llm.generate(["Hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    target = base.token_ids[5]
    out = llm.generate(["Hello"], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[target],
                                                 ignore_eos=True))[0].outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(target) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_logprobs_match_model_distribution(llm):
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0, logprobs=5))[0].outputs[0]
    assert len(out.logprobs) == 3
    first, top = out.logprobs[0]
    logits = llm.engine.prefill_logits([[5, 6, 7, 8]])[0]
    ref = torch.log_softmax(logits, -1)
    assert first.token_id == out.token_ids[0] == int(ref.argmax())
    assert first.logprob == pytest.approx(float(ref.max()), abs=1e-5)
    assert [t.token_id for t in top] == ref.topk(5).indices.tolist()
    assert [t.logprob for t in top] == pytest.approx(ref.topk(5).values.tolist(), abs=1e-5)


def test_penalties_change_greedy_output(llm):
    p = [[5, 6, 7, 8, 9]]
    plain = llm.generate(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    rep = llm.generate(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                         frequency_penalty=2.0, presence_penalty=2.0))[0].outputs[0].token_ids
    assert len(set(rep)) >= len(set(plain))
    assert rep != plain or len(set(plain)) == 30


def test_a_request_whose_text_fails_is_aborted_alone(llm, monkeypatch, caplog):
    """A detokenizer error on one request (injected: it raises on that request's 3rd token) aborts that request
    only: it reports finish_reason "abort", the others finish with their tokens, and no KV block leaks."""
    from packserve.engine.detokenizer import IncrementalDetokenizer

    real = IncrementalDetokenizer.add
    marker = [9, 9, 9, 9]

    def add(self, token):
        if list(self.prompt_token_ids[:4]) == marker and len(self.tokens) >= len(self.prompt_token_ids) + 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self, token)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7], [11, 12]], params)]
    outs = llm.generate([[5, 6, 7], marker + [1, 2], [11, 12]], params)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "abort", "length"]
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    assert len(outs[1].outputs[0].token_ids) < 8
    assert "could not be processed" in caplog.text
    alloc = llm.engine.allocator
    assert not llm.engine.has_unfinished() and alloc.num_free == alloc.num_blocks
