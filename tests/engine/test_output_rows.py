"""The last layer computes only the rows a step samples (ForwardContext.output_rows).

A prefill step samples one row per prompt, so after the last layer's attention (which still caches every
token's K/V, or updates its linear-attention state) the o_proj, MLP and final norm run on those rows only.
Checked here: the row counts the first and the last layer's MLP see, per step, and that the results equal a run
that keeps every row (prompt logprobs need all of them); test_equivalence and test_generate compare the pruned
path with transformers itself.
"""

import pytest
import torch

from packserve import LLM, SamplingParams
from packserve.checkpoints import build_linear_attn_checkpoint

LENGTHS = [1, 2, 63, 64, 65]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def layers(llm: LLM):
    model = llm.engine.runner.model
    return model.h if hasattr(model, "h") else model.model.layers


def record_mlp_rows(llm: LLM) -> list[list[int]]:
    """[rows the first layer's MLP saw, rows the last layer's MLP saw], one pair per forward pass."""
    calls: list[list[int]] = []
    first, last = layers(llm)[0].mlp, layers(llm)[-1].mlp
    first.register_forward_hook(lambda m, args, out: calls.append([args[0].shape[0]]))
    last.register_forward_hook(lambda m, args, out: calls[-1].append(args[0].shape[0]))
    return calls


@pytest.fixture(scope="module", params=["llama", "gpt2", "hybrid"])
def model_path(request, checkpoint_factory, tmp_path_factory):
    if request.param == "hybrid":  # linear-attention layers with a softmax-attention layer last
        return str(build_linear_attn_checkpoint(tmp_path_factory.mktemp("hybrid"), seed=1, num_hidden_layers=3,
                                                softmax_attention_layers=[2]))
    return checkpoint_factory(request.param)


def test_prefill_computes_the_last_layer_for_sampled_rows_only(model_path):
    llm = LLM(model_path, max_num_batched_tokens=512)
    calls = record_mlp_rows(llm)
    ps = prompts(llm.engine.info.vocab_size)
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    pruned = llm.generate(ps, greedy)
    assert calls[0] == [sum(LENGTHS), len(LENGTHS)]  # the packed prefill: 195 rows in, 5 out
    assert calls[1:] == [[len(LENGTHS), len(LENGTHS)]] * 2  # decode steps sample every row

    calls.clear()
    full = llm.generate(ps, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2,
                                           prompt_logprobs=0))
    assert calls[0] == [sum(LENGTHS), sum(LENGTHS)]  # prompt logprobs read every row
    for a, b in zip(pruned, full):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for (chosen_a, top_a), (chosen_b, top_b) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert [x.token_id for x in top_a] == [x.token_id for x in top_b] and len(top_a) == 2
            for x, y in zip([chosen_a, *top_a], [chosen_b, *top_b]):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_a_chunk_that_samples_nothing_computes_no_last_layer_rows(model_path):
    """Chunked prefill: a step holding only the first chunk of a long prompt samples nothing."""
    llm = LLM(model_path, max_num_batched_tokens=48, max_num_seqs=4)
    calls = record_mlp_rows(llm)
    out = llm.generate([prompts(llm.engine.info.vocab_size)[-1]], SamplingParams(max_tokens=2, temperature=0))
    assert calls[0] == [48, 0] and calls[1] == [65 - 48, 1], calls
    assert len(out[0].outputs[0].token_ids) == 2
