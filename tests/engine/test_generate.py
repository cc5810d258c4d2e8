"""Greedy generation through the engine == transformers `generate`, per prompt, under every scheduling path."""

import pytest
import torch

from packserve import LLM, SamplingParams
from packserve.engine.engine import LLMEngine, engine_config
from tests.support.engine_cases import run_with_arrivals

LENGTHS = [1, 2, 15, 63, 64, 65, 3, 100, 31, 7, 200, 48, 17, 5, 129, 90]  # 16 ragged prompts
NEW = 32


def prompts(vocab=500, seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


_refs: dict = {}


def hf_greedy(path, prompt_list, new=NEW):
    """Per-prompt transformers generate with EOS disabled (cached per path)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    out = []
    for p in prompt_list:
        key = (path, tuple(p), new)
        if key not in _refs:
            with torch.no_grad():
                g = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False)
            _refs[key] = g[0, len(p):].tolist()
        out.append(_refs[key])
    return out


GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_greedy_matches_transformers(arch, checkpoint_factory):
    path = checkpoint_factory(arch)
    ps = prompts()
    llm = LLM(path)
    outs = llm.generate(ps, GREEDY)
    refs = hf_greedy(path, ps)
    for o, ref in zip(outs, refs):
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].finish_reason == "length"
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


def test_greedy_matches_transformers_on_the_torch_decode_path(checkpoint_factory, monkeypatch):
    """PACKSERVE_CPU_KERNELS=0: decode steps gather KV blocks and run SDPA instead of the C kernel."""
    from packserve.kernels import cpu_ops

    path = checkpoint_factory("llama")
    ps = prompts(seed=5)
    assert LLM(path).engine.runner.decode_kernel == ("cpu" if cpu_ops.available() else None)
    monkeypatch.setenv("PACKSERVE_CPU_KERNELS", "0")
    llm = LLM(path)
    assert llm.engine.runner.decode_kernel is None
    assert [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)] == hf_greedy(path, ps)


def test_greedy_matches_transformers_on_the_triton_decode_path(checkpoint_factory, monkeypatch):
    """The GPU decode path, the Triton paged kernel: fed by the runner's block tables and context lengths, the
    greedy tokens match transformers. On a GPU host in fp32 on CUDA; elsewhere in the Triton interpreter on CPU
    tensors (the runner told to use it)."""
    import triton.language as tl

    path = checkpoint_factory("llama")
    ps = prompts(seed=6)[:5]
    if torch.cuda.is_available():  # eager: replayed CUDA graphs would not call the wrapper from Python
        llm = LLM(path, device="cuda", dtype="float32", enforce_eager=True)
        assert llm.engine.runner.decode_kernel == "triton" and llm.engine.runner.graphs is None
    else:
        if type(tl.standard.sum).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported without TRITON_INTERPRET")
        llm = LLM(path)
        llm.engine.runner.decode_kernel = "triton"
    import packserve.kernels.paged_attention_triton as kernel  # the operator's implementation calls the wrapper there

    calls, real = [], kernel.paged_decode_attention_triton
    monkeypatch.setattr(kernel, "paged_decode_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = llm.generate(ps, GREEDY)
    assert calls  # the decode steps went through the Triton kernel
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ps)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_greedy_matches_transformers_other_families(arch, checkpoint_factory):
    path = checkpoint_factory(arch)
    ps = prompts(seed=3)[:8]
    outs = LLM(path).generate(ps, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ps)


def test_requests_arriving_while_others_decode(checkpoint_factory):
    """Continuous batching: new prompts join mid-decode (mixed prefill + decode steps)."""
    path = checkpoint_factory("llama")
    ps = prompts(seed=1)
    engine = LLMEngine(engine_config(path, max_num_seqs=6, max_num_batched_tokens=256))
    # Two new requests every third step.
    got = run_with_arrivals(engine, ps, GREEDY, every=3, per_arrival=2)
    assert got == hf_greedy(path, ps)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_chunked_prefill_long_prompts(checkpoint_factory, monkeypatch):
    """Prompts longer than the token budget are prefilled over several steps; on CPU the later chunks go through
    the C prefill operator (keys read through the block table) wherever the kernels are built."""
    import packserve.layers.paged_attention_layer as paged

    calls = []
    real = paged.cpu_ops.paged_prefill_attention
    monkeypatch.setattr(paged.cpu_ops, "paged_prefill_attention", lambda *a: calls.append(a[6].tolist()) or real(*a))
    path = checkpoint_factory("qwen3")
    ps = prompts(seed=2, lengths=[300, 129, 64, 65, 1, 250])
    llm = LLM(path, max_num_batched_tokens=48, max_num_seqs=4)
    outs = llm.generate(ps, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ps)
    assert bool(calls) == paged.cpu_ops.has_varlen() and all(n > 1 for c in calls for n in c)


def test_chunked_prefill_with_masks_built_per_slice(checkpoint_factory, monkeypatch):
    """The same chunked prefill on the torch span path (the one without the C prefill operator) with the
    paged-attention mask limit at 500 elements: every later chunk's causal mask is built in slices of query rows
    (what keeps a long prompt's 8192 x 32k mask out of memory); the greedy tokens still match transformers."""
    import packserve.layers.paged_attention_layer as paged

    monkeypatch.setattr(paged.cpu_ops, "has_varlen", lambda: False)
    built = []
    real = paged.span_mask
    monkeypatch.setattr(paged, "span_mask", lambda *a: built.append(len(a[1])) or real(*a))
    monkeypatch.setattr(paged, "MASK_MAX_ELEMENTS", 500)
    path = checkpoint_factory("qwen3")
    ps = prompts(seed=2, lengths=[300, 129, 64, 65, 1, 250])
    outs = LLM(path, max_num_batched_tokens=48, max_num_seqs=4).generate(ps, GREEDY)
    assert built and max(built) < 48  # slices of rows, built inside attention
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ps)


def test_tiny_kv_cache_forces_preemption(checkpoint_factory):
    path = checkpoint_factory("llama")
    ps = prompts(seed=4)
    # 16 prompts (~900 tokens) + 32 new each need ~90 blocks of 16; give 24 (the longest needs 15).
    llm = LLM(path, num_kv_blocks=24, block_size=16)
    outs = llm.generate(ps, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_preemptions for o in outs) == llm.engine.scheduler.num_preemptions
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ps)
    assert llm.engine.allocator.num_free == 24


def test_seeded_sampling_is_reproducible(checkpoint_factory):
    path = checkpoint_factory("llama")
    ps = prompts(seed=5)[:6]
    llm = LLM(path)
    sp = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=100 + i, ignore_eos=True)
          for i in range(len(ps))]
    a = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
    # Same seeds in another batch composition (reversed order, extra unseeded requests) -> same tokens.
    extra = prompts(seed=6)[:3]
    sp_extra = [SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)] * 3
    b = llm.generate(list(reversed(ps)) + extra, list(reversed(sp)) + sp_extra)
    assert [o.outputs[0].token_ids for o in b[:len(ps)]][::-1] == a
    c = llm.generate(ps, [SamplingParams(max_tokens=24, temperature=1.0, seed=999, ignore_eos=True)] * len(ps))
    assert [o.outputs[0].token_ids for o in c] != a
    # Sampling differs from greedy (temperature 1 on random weights).
    g = llm.generate(ps, GREEDY)
    assert [o.outputs[0].token_ids[:24] for o in g] != a


def test_abort_frees_blocks(checkpoint_factory):
    engine = LLMEngine(engine_config(checkpoint_factory("llama")))
    for i, p in enumerate(prompts(seed=7)[:5]):
        engine.add_request(p, GREEDY, request_id=f"r{i}")
    engine.step()
    engine.step()
    assert engine.allocator.num_used > 0
    out = engine.abort_request("r2")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.abort_request("r2") is None  # idempotent
    for i in (0, 1, 3, 4):
        engine.abort_request(f"r{i}")
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()


def _mixed_workload(vocab=500):
    """Ragged prompts, four of them sharing a 96-token prefix with an earlier one (prefix-cache hits later on)."""
    ps = prompts(seed=11, lengths=[120, 3, 65, 200, 1, 17, 64, 90])
    shared = ps[0][:96]
    g = torch.Generator().manual_seed(12)
    ps += [shared + torch.randint(5, vocab, (n,), generator=g).tolist() for n in (4, 40, 1, 70)]
    return ps


@pytest.mark.parametrize("arch,kernel", [("llama", None), ("qwen3", None), ("gpt2", None), ("llama", "torch"),
                                         ("llama", "triton")])
def test_everything_mixed_in_the_same_steps(arch, kernel, checkpoint_factory, monkeypatch):
    """Staggered arrivals, chunked prefill (a 64-token budget), prefix-cache hits and preemption (a small cache)
    in the same steps, every new token attending through the block table: greedy tokens equal transformers'."""
    import triton.language as tl

    import packserve.layers.paged_attention_layer as paged

    if kernel == "triton" and type(tl.standard.sum).__name__ != "InterpretedFunction":
        pytest.skip("the Triton kernel on CPU tensors needs the interpreter (TRITON_INTERPRET=1)")
    path = checkpoint_factory(arch)
    engine = LLMEngine(engine_config(path, device="cpu", dtype="float32", max_num_batched_tokens=64,
                                     max_num_seqs=6, num_kv_blocks=26, block_size=16))
    if kernel == "torch":
        engine.runner.decode_kernel = None
    elif kernel == "triton":
        engine.runner.decode_kernel = "triton"
    steps = []
    real = paged.build_paged_meta
    monkeypatch.setattr(paged, "build_paged_meta", lambda *a, **k: steps.append(sorted(set(a[0].q_host.tolist()))) or real(*a, **k))
    ps = _mixed_workload()
    new = 12 if kernel == "triton" else NEW
    got = run_with_arrivals(engine, ps, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True), every=3,
                            per_arrival=2)
    assert got == hf_greedy(path, ps, new=new)
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.prefix_cache_hits > 0
    assert any(len(q) > 1 and q[0] == 1 for q in steps), "no step mixed decodes with longer queries"
    assert engine.allocator.num_free == engine.allocator.num_blocks
