"""Tensor parallelism on CPU (gloo, 2 processes): greedy and seeded tokens identical to one process, with staggered
arrivals, chunked prefill, prefix-cache hits and preemption; each rank holds half of the split weights and of the
KV heads (or the one KV head its query heads read, replicated); bad splits are one-line errors."""

from __future__ import annotations

import pytest
import torch

from packserve import LLM, SamplingParams
from packserve.config import ConfigError
from packserve.engine.engine import LLMEngine, engine_config
from tests.support.engine_cases import run_with_arrivals

LENGTHS = [1, 2, 17, 63, 64, 65, 130, 7, 40, 3]


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randint(5, 500, (n,), generator=g).tolist() for n in LENGTHS]
    return ps + [ps[6][:96] + [7, 8, 9]]  # a prefix-cache hit on a later arrival


def _run(path, tp, params, **kw):
    kw.setdefault("norm_mode", "native")
    engine = LLMEngine(engine_config(path, device="cpu", dtype="float32", tensor_parallel_size=tp,
                                     max_num_batched_tokens=64, max_num_seqs=5, num_kv_blocks=16, block_size=16, **kw))
    try:
        out = run_with_arrivals(engine, _prompts(), params, every=2, per_arrival=2)
        stats = (engine.scheduler.num_preemptions, engine.scheduler.prefix_cache_hits)
        return out, stats, engine
    finally:
        engine.shutdown()


@pytest.mark.parametrize("arch,overrides,norm", [("gpt2", {}, "native"), ("gpt2", {}, "crmsnorm")])
def test_two_ranks_match_one_gpt2(checkpoint_factory, arch, overrides, norm):
    """GPT-2: the fused c_attn split per q/k/v part, the vocabulary-parallel tied head (native) or the converted
    model's untied head with the folded bias (CRMSNorm)."""
    path = checkpoint_factory(arch, initializer_range=0.15, **overrides)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    one, _, _ = _run(path, 1, greedy, norm_mode=norm)
    two, stats2, engine = _run(path, 2, greedy, norm_mode=norm)
    assert two == one and stats2[0] > 0
    block = engine.model.h[0]
    assert block.num_heads * 2 * block.head_dim == block.c_attn.full_sizes["q"]
    assert engine.kv_cache.data.shape[3] == block.num_heads


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"num_key_value_heads": 1}), ("qwen3", {}),
                                            ("mistral", {}), ("llama", {"vocab_size": 515}),
                                            ("llama", {"tie_word_embeddings": True})])
def test_two_ranks_match_one(checkpoint_factory, arch, overrides):
    path = checkpoint_factory(arch, initializer_range=0.15, **overrides)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    one, stats, _ = _run(path, 1, greedy)
    two, stats2, engine = _run(path, 2, greedy)
    assert two == one
    assert stats2[0] > 0 and stats2[1] > 0, "the workload should preempt and hit the prefix cache"
    # Rank 0 holds its shard: half the query heads, half the KV heads (or the replicated one), half the MLP.
    attn = engine.model.model.layers[0].self_attn
    cfg = engine.model.cfg
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    assert attn.num_heads == cfg["num_attention_heads"] // 2 and attn.num_kv_heads == max(1, kv // 2)
    mlp = engine.model.model.layers[0].mlp
    assert mlp.gate_up_proj.weight.shape[0] == cfg["intermediate_size"] and \
        mlp.down_proj.weight.shape[1] == cfg["intermediate_size"] // 2
    assert engine.kv_cache.data.shape[3] == max(1, kv // 2)
    vocab = cfg["vocab_size"]
    assert engine.model.model.embed_tokens.weight.shape[0] == -(-vocab // 2)  # half the vocabulary's rows


def test_logprobs_and_prompt_logprobs_match(checkpoint_factory):
    """Sampled and prompt logprobs (gathered from both ranks' vocabulary slices) equal one process's."""
    path = checkpoint_factory("llama", initializer_range=0.15, vocab_size=515)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    ps = _prompts()[:5]

    def run(tp):
        with LLM(path, device="cpu", dtype="float32", tensor_parallel_size=tp, max_num_batched_tokens=48,
                 max_num_seqs=4) as llm:
            return llm.generate(ps, params)

    one, two = run(1), run(2)
    for a, b in zip(one, two):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for (ca, ta), (cb, tb) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert ca.token_id == cb.token_id and abs(ca.logprob - cb.logprob) < 1e-4
            assert [t.token_id for t in ta] == [t.token_id for t in tb]
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_token_ids)
        for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert ea[0].token_id == eb[0].token_id and abs(ea[0].logprob - eb[0].logprob) < 1e-4


@pytest.mark.parametrize("feature_map", ["elu1", "nalaformer"])
def test_two_ranks_match_one_linear_attention(tmp_path, feature_map):
    """The hybrid linear-attention model: linear layers' heads and recurrent states split by rank (state slots
    numbered by rank 0), the softmax layer as in Llama."""
    from packserve.checkpoints import build_linear_attn_checkpoint

    path = str(build_linear_attn_checkpoint(tmp_path / "lin", softmax_attention_layers=[1], feature_map=feature_map,
                                            initializer_range=0.2))
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    one, _, _ = _run(path, 1, greedy)
    two, _, engine = _run(path, 2, greedy)
    assert two == one
    assert engine.state_cache.S.shape[2] == 1  # 2 KV heads over 2 ranks: one each


def test_seeded_sampling_matches(checkpoint_factory):
    path = checkpoint_factory("llama", initializer_range=0.15)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    assert _run(path, 2, sampled)[0] == _run(path, 1, sampled)[0]


def test_offline_llm_and_clean_shutdown(checkpoint_factory):
    path = checkpoint_factory("llama", initializer_range=0.15)
    ps = _prompts()[:4]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2) as llm:
        procs = list(llm.engine.tp.procs)
        got = [o.outputs[0].token_ids for o in llm.generate(ps, greedy)]
    assert all(not p.is_alive() for p in procs)
    assert got == [o.outputs[0].token_ids for o in LLM(path, device="cpu", dtype="float32").generate(ps, greedy)]


@pytest.mark.parametrize("arch,overrides,match", [
    ("llama", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3}, "divide"),
    ("llama", {"intermediate_size": 97}, "MLP width"),
])
def test_bad_splits_are_one_line_errors(checkpoint_factory, arch, overrides, match):
    path = checkpoint_factory(arch, **overrides)
    with pytest.raises(ConfigError, match=match) as e:
        LLMEngine(engine_config(path, device="cpu", dtype="float32", tensor_parallel_size=4))
    assert "\n" not in str(e.value)


def test_rank_zero_port_in_use_is_a_one_line_error(checkpoint_factory, monkeypatch):
    """Ranks started by torchrun: rank 0 listens on MASTER_PORT; when that port is taken, say so in one line."""
    import socket

    path = checkpoint_factory("llama")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "2"}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: the port is in use") as e:
            LLMEngine(engine_config(path, device="cpu", dtype="float32", tensor_parallel_size=2))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_only_its_shards(checkpoint_factory, monkeypatch, rank):
    """With two ranks, loading reads the split weights as slices (never whole) and each rank's shard equals the
    matching slice of the checkpoint; only unsplit tensors (embedding, norms) are read whole."""
    from safetensors.torch import load_file

    from packserve import distributed
    from packserve.models.loader import LazyTensor, load_model

    path = checkpoint_factory("llama", num_key_value_heads=1)
    whole = []
    real = LazyTensor.load
    monkeypatch.setattr(LazyTensor, "load", lambda self: whole.append(self.name) or real(self))
    distributed.set_tensor_parallel(rank, 2)
    try:
        model = load_model(path, torch.device("cpu"), torch.float32, 128)
    finally:
        distributed.set_tensor_parallel(0, 1)
    assert whole and all("proj" not in n for n in whole), whole
    ref = {}
    for f in sorted(__import__("pathlib").Path(path).glob("*.safetensors")):
        ref.update(load_file(f))
    attn = model.model.layers[0].self_attn
    D, Hq = attn.head_dim, attn.num_heads
    qkv = attn.qkv_proj.weight
    assert torch.equal(qkv[:Hq * D], ref["model.layers.0.self_attn.q_proj.weight"][rank * Hq * D:(rank + 1) * Hq * D])
    assert torch.equal(qkv[Hq * D:], torch.cat([ref["model.layers.0.self_attn.k_proj.weight"],
                                               ref["model.layers.0.self_attn.v_proj.weight"]]))  # 1 KV head: both
    o = attn.o_proj.weight
    assert torch.equal(o, ref["model.layers.0.self_attn.o_proj.weight"][:, rank * Hq * D:(rank + 1) * Hq * D])
