"""GPU backends (varlen, flex, xformers, sdpa on CUDA) against the fp32 CPU engine. Skipped without CUDA."""

import pytest
import torch

from packserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LENGTHS = [1, 2, 15, 63, 64, 65, 300, 129, 7, 1000]


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory("llama", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def cpu_logits(ckpt):
    return LLM(ckpt, device="cpu", num_kv_blocks=256).engine.prefill_logits(prompts())


@pytest.mark.parametrize("backend", ["varlen", "sdpa", "flex", "xformers"])
def test_bf16_backends_match_fp32_cpu(backend, ckpt, cpu_logits):
    llm = LLM(ckpt, device="cuda", dtype="bfloat16", backend=backend, num_kv_blocks=256)
    got = llm.engine.prefill_logits(prompts()).float().cpu()
    for i in range(len(LENGTHS)):
        err = float((got[i] - cpu_logits[i]).abs().max() / cpu_logits[i].abs().max())
        assert err < 3e-2, (backend, llm.engine.backend.name, LENGTHS[i], err)


def test_fp32_cuda_greedy_equals_cpu(ckpt):
    ps = prompts(1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in LLM(ckpt, device="cpu").generate(ps, params)]
    gpu = LLM(ckpt, device="cuda", dtype="float32", backend="sdpa")
    assert [o.outputs[0].token_ids for o in gpu.generate(ps, params)] == cpu
    assert gpu.engine.allocator.num_used == 0


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_other_families_on_cuda(arch, checkpoint_factory):
    """Qwen3 (q/k norms over heads sliced out of the fused QKV: strided rows for the Triton norm) and GPT-2
    (LayerNorm, learned positions, one KV head per query head) through the default CUDA path (Triton norms,
    captured decode graphs): fp32 greedy equal to the CPU engine, bf16 prefill logits close to it."""
    path = checkpoint_factory(arch, max_position_embeddings=2048)
    ps = prompts(2)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    cpu_llm = LLM(path, device="cpu", num_kv_blocks=256)
    cpu = [o.outputs[0].token_ids for o in cpu_llm.generate(ps, params)]
    ref = cpu_llm.engine.prefill_logits(ps)
    gpu = LLM(path, device="cuda", dtype="float32", num_kv_blocks=256)
    assert gpu.engine.runner.graphs is not None
    assert [o.outputs[0].token_ids for o in gpu.generate(ps, params)] == cpu
    got = LLM(path, device="cuda", dtype="bfloat16", num_kv_blocks=256).engine.prefill_logits(ps).float().cpu()
    for i in range(len(LENGTHS)):
        err = float((got[i] - ref[i]).abs().max() / ref[i].abs().max())
        assert err < 3e-2, (arch, LENGTHS[i], err)
