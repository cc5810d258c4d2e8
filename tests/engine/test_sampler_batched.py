"""The batched sampler equals the per-row one it replaced (tests/engine/sampler_reference.py) on every option,
over several steps of growing outputs, for greedy and seeded rows; and it reads the device a constant number of
times per step, whatever the number of rows (counted on .tolist()/.item()/int()/float()/bool() of tensors)."""

from __future__ import annotations

import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from packserve.engine.request import Request, SamplingParams
from packserve.engine.sampler import Sampler
from tests.engine.sampler_reference import ReferenceSampler

V = 300
OPTIONS = [
    dict(temperature=0.0),
    dict(temperature=0.8),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.2, top_p=0.7),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=40, top_p=0.9, min_p=0.01),
    dict(temperature=1.0, top_k=V + 5),  # larger than the vocabulary: off
    dict(temperature=0.7, repetition_penalty=1.3),
    dict(temperature=0.0, repetition_penalty=0.7),
    dict(temperature=1.0, presence_penalty=0.8, frequency_penalty=0.4),
    dict(temperature=0.0, frequency_penalty=-1.5),
    dict(temperature=1.0, repetition_penalty=1e-300),
    dict(temperature=1.0, min_tokens=3, stop_token_ids=(5, 6)),
    dict(temperature=0.0, min_tokens=2),
    dict(temperature=1.0, logit_bias={7: 5.0, 8: -100.0}),
    dict(temperature=1.0, allowed_token_ids=(1, 2, 3, 50)),
    dict(temperature=0.0, bad_words_ids=((11,), (12, 13))),
    dict(temperature=1.0, logprobs=0),
    dict(temperature=0.0, logprobs=5),
    dict(temperature=1.1, top_p=0.5, logprobs=2, presence_penalty=0.3),
]


def _requests(seed_offset: int) -> list[Request]:
    reqs = []
    for i, opt in enumerate(OPTIONS):
        p = SamplingParams(max_tokens=50, seed=1000 + i + seed_offset, **opt)
        reqs.append(Request(f"r{i}", [(i * 7 + j) % V for j in range(5 + i)], p, eos_token_ids=(0,)))
    return reqs


@pytest.mark.parametrize("trial", range(3))
def test_batched_equals_per_row_on_every_option(trial):
    g = torch.Generator().manual_seed(trial)
    batched, reference = Sampler(), ReferenceSampler()
    a, b = _requests(trial), _requests(trial)
    order = list(range(len(a)))
    for step in range(6):
        random.Random(step + 10 * trial).shuffle(order)  # rows move between steps, as the batch changes
        logits = torch.randn(len(a), V, generator=g) * 3
        logits[:, 0] += 2.0  # EOS likely: min_tokens must hold it back
        ra, rb = [a[k] for k in order], [b[k] for k in order]
        got, want = batched(logits.clone(), ra), reference(logits.clone(), rb)
        assert got.token_ids == want.token_ids, step
        for x, y in zip(got.logprobs, want.logprobs):
            assert (x is None) == (y is None)
            if x is not None:
                assert x[0] == y[0] and [(t.token_id, t.logprob) for t in x[1]] == \
                    [(t.token_id, t.logprob) for t in y[1]]
        for r, t in zip(ra, got.token_ids):
            r.output_token_ids.append(t)
        for r, t in zip(rb, want.token_ids):
            r.output_token_ids.append(t)


class _Reads(TorchFunctionMode):
    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("logprobs", [None, 3])
def test_device_reads_do_not_grow_with_rows(logprobs):
    counts = []
    for rows in (2, 8, 32):
        reqs = []
        for i in range(rows):
            opt = dict(OPTIONS[i % len(OPTIONS)])
            opt["logprobs"] = logprobs
            reqs.append(Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=9, seed=i, **opt), eos_token_ids=(0,)))
            reqs[-1].output_token_ids = [4, 5]
        with _Reads() as reads:
            Sampler()(torch.randn(rows, V), reqs)
        counts.append(reads.count)
    assert counts[0] == counts[1] == counts[2] <= (2 if logprobs else 1), counts
