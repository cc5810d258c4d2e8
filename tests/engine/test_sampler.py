"""Sampler filters checked on hand-made logits (no model)."""

import math

import pytest
import torch

from packserve.engine.request import Request, SamplingParams
from packserve.engine.sampler import Sampler

V = 10
LOGITS = torch.log(torch.tensor([0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.04, 0.02, 0.007, 0.003]))


def draw(params: SamplingParams, n: int = 400, output=(), prompt=(1,)) -> list[int]:
    """n independent requests over the same logits (unseeded requests use the global RNG, seeded here)."""
    torch.manual_seed(0)
    sampler = Sampler()
    reqs = []
    for i in range(n):
        r = Request(f"r{i}", list(prompt), params)
        r.output_token_ids = list(output)
        reqs.append(r)
    return sampler(LOGITS.repeat(n, 1), reqs).token_ids


def test_greedy_is_argmax():
    assert set(draw(SamplingParams(temperature=0), 5)) == {0}


def test_greedy_ties_take_the_first_index_like_argmax():
    """Ties (e.g. rows banned to -inf but two survivors) resolve to the first maximal index, as torch.argmax
    and transformers do, for an all-greedy batch and for greedy rows mixed with sampled ones."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 32000, generator=g)
    cols = [(7, 31999), (31000, 12), (0, 5), (16000, 16001), (3, 30000), (29999, 2)]
    for row, (a, b) in enumerate(cols):
        logits[row, a] = logits[row, b] = 50.0
    want = logits.argmax(-1).tolist()
    assert want == [min(c) for c in cols]
    greedy = [Request(f"g{i}", [1], SamplingParams(temperature=0)) for i in range(6)]
    assert Sampler()(logits, greedy).token_ids == want
    mixed = [Request(f"m{i}", [1], SamplingParams(temperature=0 if i % 2 else 1.0, seed=i)) for i in range(6)]
    got = Sampler()(logits, mixed).token_ids
    assert [got[i] for i in (1, 3, 5)] == [want[i] for i in (1, 3, 5)]


def test_top_k_top_p_min_p_restrict_support():
    assert set(draw(SamplingParams(top_k=3))) <= {0, 1, 2}
    # top_p 0.6: the smallest prefix reaching 0.6 is {0, 1, 2} (0.30 + 0.25 + 0.15 = 0.70).
    assert set(draw(SamplingParams(top_p=0.6))) == {0, 1, 2}
    # min_p 0.3: keep p >= 0.3 * 0.30 = 0.09 -> {0, 1, 2, 3}
    assert set(draw(SamplingParams(min_p=0.3))) == {0, 1, 2, 3}


def test_temperature_sampling_follows_the_distribution():
    toks = draw(SamplingParams(temperature=1.0), n=4000)
    freq0 = toks.count(0) / len(toks)
    assert abs(freq0 - 0.30) < 0.03
    hot = draw(SamplingParams(temperature=0.2), n=2000)
    assert hot.count(0) / len(hot) > 0.6  # low temperature sharpens


def test_penalties_follow_openai_and_hf_definitions():
    s = Sampler()
    r = Request("a", [0], SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5,
                                         repetition_penalty=2.0))
    r.output_token_ids = [1, 1, 2]
    logits = torch.tensor([[2.0, 2.0, -1.0, 0.5]])
    from packserve.engine.sampler import _apply_penalties

    rows = logits.clone()
    _apply_penalties(rows, [r])
    row = rows[0]
    # repetition over prompt+output (tokens 0, 1, 2): positive / 2, negative * 2; then OpenAI penalties on output.
    expected = torch.tensor([1.0, 1.0 - 1.0 - 0.5 * 2, -2.0 - 1.0 - 0.5, 0.5])
    assert torch.allclose(row, expected)
    del s


def test_seeded_requests_do_not_depend_on_batch():
    p = SamplingParams(temperature=1.0, seed=7)
    a = draw(p, n=1)
    b = draw(p, n=5)
    assert all(t == a[0] for t in b)


@pytest.mark.parametrize("n", [0, 3])
def test_logprobs_are_raw_log_softmax(n):
    s = Sampler()
    r = Request("a", [0], SamplingParams(temperature=0, logprobs=n))
    res = s(LOGITS.unsqueeze(0), [r])
    chosen, top = res.logprobs[0]
    assert chosen.token_id == 0 and chosen.logprob == pytest.approx(math.log(0.30), abs=1e-5)
    assert [t.token_id for t in top] == [0, 1, 2][:n]


def test_tiny_temperatures_sample_greedily_instead_of_nan():
    """temperature 1e-45 overflowed the scaled logits to inf and NaN probabilities (which picked token 0 = EOS);
    below 1e-5 sampling is the argmax, as vLLM does."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=g)
    reqs = [Request(f"t{i}", [1], SamplingParams(temperature=t)) for i, t in enumerate([1e-45, 1e-30, 9e-6, 0.0])]
    assert Sampler()(logits.clone(), reqs).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
def test_extreme_repetition_penalties_keep_probabilities_finite(penalty):
    """repetition_penalty 1e-300 divides positive logits of seen tokens to inf: the row must stay a valid
    distribution. Tiny penalties make the seen tokens with positive logits win; huge ones shrink those to ~0 and
    push the negative one to the bottom, where it is never drawn."""
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5, 3.0, -2.0]] * 64)
    seen = [2, 3, 5]  # tokens 2 and 3 positive, 5 negative
    reqs = [Request(f"p{i}", seen, SamplingParams(temperature=1.0, repetition_penalty=penalty, seed=i))
            for i in range(64)]
    got = Sampler()(logits, reqs).token_ids
    if penalty < 1:
        assert set(got) <= {2, 3} and len(set(got)) == 2  # both at the clamped maximum: a coin toss each
    else:
        assert 5 not in got and set(got) <= {0, 1, 2, 3, 4} and 4 in got


def test_logit_bias_per_row_in_one_step():
    """Rows of one step with different biases: +100 forces a token, -100 bans the greedy one, no bias is untouched;
    the raw distribution still feeds the logprobs."""
    from packserve.engine.request import Request, SamplingParams
    from packserve.engine.sampler import Sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    top = int(logits[1].argmax())
    reqs = [Request(f"r{i}", [1, 2], SamplingParams(temperature=0, logprobs=0, logit_bias=b))
            for i, b in enumerate([{"7": 100}, {top: -100.0}, {}])]
    out = Sampler()(logits.clone(), reqs)
    assert out.token_ids[0] == 7
    assert out.token_ids[1] == int(logits[1].clone().index_fill_(0, torch.tensor([top]), -1e9).argmax())
    assert out.token_ids[2] == int(logits[2].argmax())
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[0][0].logprob == pytest.approx(float(raw[0, 7]), abs=1e-5)


def test_logit_bias_is_validated():
    from packserve.engine.request import ParameterError, SamplingParams

    assert SamplingParams(logit_bias={"3": 1, 2: -5.5}).logit_bias == ((2, -5.5), (3, 1.0))
    for bad in ({"a": 1}, {"-1": 1}, {1: 101}, {1: float("nan")}, {1: True}, {True: 1}, {"1.5": 2},
                {i: 1 for i in range(2049)}):
        with pytest.raises(ParameterError) as e:
            SamplingParams(logit_bias=bad)
        assert e.value.param == "logit_bias"


def test_allowed_token_ids_restrict_each_row_in_one_step():
    from packserve.engine.request import ParameterError, Request, SamplingParams, validate_request
    from packserve.engine.sampler import Sampler

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=g)
    allowed = [(3, 9), (), (17,)]
    reqs = [Request(f"r{i}", [1], SamplingParams(temperature=t, seed=5, allowed_token_ids=a))
            for i, (a, t) in enumerate(zip(allowed, (0, 0, 1.0)))]
    out = Sampler()(logits.clone(), reqs)
    assert out.token_ids[0] == max((3, 9), key=lambda t: float(logits[0, t]))
    assert out.token_ids[1] == int(logits[1].argmax()) and out.token_ids[2] == 17
    with pytest.raises(ParameterError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[-1])
    with pytest.raises(ParameterError, match="outside the vocabulary"):
        validate_request([1], SamplingParams(allowed_token_ids=[40]), 40, 64)


def test_bad_words_ban_a_sequence_only_after_its_prefix():
    from packserve.engine.request import ParameterError, Request, SamplingParams
    from packserve.engine.sampler import Sampler

    logits = torch.zeros(2, 10)
    logits[:, 4] = 5.0  # the greedy choice
    params = SamplingParams(temperature=0, bad_words_ids=[[4], [7, 3]])
    a = Request("a", [1], params)
    b = Request("b", [1], SamplingParams(temperature=0, bad_words_ids=[[2, 9]]))
    b.output_token_ids = [5, 2]
    logits[1, 9] = 9.0
    out = Sampler()(logits.clone(), [a, b])
    assert out.token_ids[0] != 4 and out.token_ids[1] != 9  # [4] always; [2, 9] after 2
    a.output_token_ids = [7]
    logits[0, 3] = 6.0
    assert Sampler()(logits.clone(), [a]).token_ids[0] not in (3, 4)
    a.output_token_ids = [8]
    assert Sampler()(logits.clone(), [a]).token_ids[0] == 3  # [7, 3] only after 7
    with pytest.raises(ParameterError):
        SamplingParams(bad_words_ids=[[]])
