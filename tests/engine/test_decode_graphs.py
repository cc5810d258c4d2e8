"""Decode steps replayed from fixed buffers padded to a captured batch size (packserve.engine.cuda_graphs).

On CPU the graphs run in their "eager" mode: the same static-buffer forward, padding rows and scratch block as the
CUDA graphs, called instead of replayed. Greedy tokens must equal transformers' with padded and unpadded batches,
mixed (eager) steps in between, and the scratch block poisoned outside the slot the padding rows write.
"""

import pytest
import torch

from packserve import LLM, SamplingParams
from packserve.engine.cuda_graphs import DecodeGraphs, capture_sizes
from packserve.engine.engine import LLMEngine, engine_config
from packserve.engine.input_batch import InputBatch
from packserve.kernels import cpu_ops
from tests.support.engine_cases import run_with_arrivals
from tests.engine.test_generate import NEW, _mixed_workload, hf_greedy, prompts

# The CPU tests replay through the C decode kernel; the Triton test (CUDA graphs on a GPU) does not need it.
needs_c_kernel = pytest.mark.skipif(not cpu_ops.available(), reason="needs the C decode kernel (the paged kernel on CPU)")


def test_capture_sizes():
    assert capture_sizes(64, 8192) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(12, 8192) == [1, 2, 4, 8, 12]  # the largest decode batch is always captured
    assert capture_sizes(3, 8192) == [1, 2, 3]
    assert capture_sizes(128, 20) == [1, 2, 4, 8, 16, 20]  # a step holds at most the token budget
    assert capture_sizes(4096, 1 << 20)[-1] == 512
    with pytest.raises(ValueError):
        DecodeGraphs([4, 2])


def test_bucket_picks_the_next_size():
    g = DecodeGraphs([1, 2, 4, 8], mode="eager")
    assert g.bucket(3) is None  # nothing captured yet
    g.capture(lambda B: torch.zeros(B, 2), [])
    assert [g.bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def test_padding_rows_point_at_the_scratch_block():
    ib = InputBatch(8, 4, 64, 4, torch.device("cpu"))
    view = ib.fill([], [], [], [], pad_to=5, scratch_block=9)
    assert view.num_rows == 0 and ib.num_tokens == 5
    ids, pos, slots = ib.step_inputs()
    assert ids.tolist() == [0] * 5 and pos.tolist() == [0] * 5 and slots.tolist() == [36] * 5
    assert ib.table[:5, 0].tolist() == [9] * 5 and ib.rows_dev[2, :5].tolist() == [1] * 5
    with pytest.raises(AssertionError):  # only decode steps are padded
        ib.fill([], [1, 2], [0, 1], [0, 1], pad_to=4)


def _poison_scratch(engine) -> None:
    """NaN in the scratch block: a real row reading it, or a padding row reading more than its own slot, turns
    logits into NaN (and tokens into garbage)."""
    bs = engine.kv_cache.block_size
    engine.kv_cache.data[:, :, engine.kv_cache.scratch_block * bs:] = float("nan")


@needs_c_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_transformers_through_padded_graphs(arch, checkpoint_factory):
    path = checkpoint_factory(arch)
    ps = prompts(seed=11)[:11]  # 11 decoding together: padded to 16; as they finish, other buckets
    llm = LLM(path, max_num_seqs=16)
    llm.engine.runner.capture_decode_graphs([1, 2, 4, 8, 16], mode="eager")
    _poison_scratch(llm.engine)
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(ps))]
    outs = llm.generate(ps, params)
    assert llm.engine.runner.graphs.num_replays > 0
    refs = [hf_greedy(path, [p], new=sp.max_tokens)[0] for p, sp in zip(ps, params)]
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


@needs_c_kernel
def test_mixed_steps_stay_eager_and_match(checkpoint_factory):
    """Staggered arrivals, chunked prefill, prefix hits and preemption: mixed steps run eagerly, pure decode
    steps replay; the tokens are transformers'."""
    path = checkpoint_factory("llama")
    engine = LLMEngine(engine_config(path, device="cpu", dtype="float32", max_num_batched_tokens=64,
                                     max_num_seqs=6, num_kv_blocks=26, block_size=16))
    engine.runner.capture_decode_graphs(capture_sizes(6, 64), mode="eager")
    _poison_scratch(engine)
    ps = _mixed_workload()  # the workload of test_generate's mixed-steps test, whose cache forces preemption
    got = run_with_arrivals(engine, ps, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True), every=3,
                            per_arrival=2)
    assert got == hf_greedy(path, ps, new=NEW)
    assert engine.runner.graphs.num_replays > 0
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.prefix_cache_hits > 0
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_graphs_need_a_paged_decode_kernel(checkpoint_factory):
    llm = LLM(checkpoint_factory("llama"))
    llm.engine.runner.decode_kernel = None  # the gather + SDPA path builds its mask on the host
    with pytest.raises(ValueError, match="paged decode kernel"):
        llm.engine.runner.capture_decode_graphs([1, 2])


@needs_c_kernel
def test_reallocated_buffers_drop_the_graphs(checkpoint_factory):
    """prefill_logits of more tokens than a step's budget grows the token buffers: the graphs would read freed
    memory, so they are dropped and decode steps run eagerly (still correct)."""
    path = checkpoint_factory("llama")
    llm = LLM(path, max_num_batched_tokens=64, max_num_seqs=4)
    runner = llm.engine.runner
    runner.capture_decode_graphs([1, 2, 4], mode="eager")
    llm.engine.prefill_logits([[5] * 100])
    ps = prompts(seed=2)[:3]
    outs = llm.generate(ps, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert runner.graphs.num_replays == 0 and runner.graphs.bucket(1) is None
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ps, new=6)


def test_triton_decode_kernel_through_padded_graphs(checkpoint_factory):
    """The CUDA graphs' own kernel: the Triton paged decode launch with the split count fixed by the model's
    context length (in the interpreter on CPU; on CUDA, captured graphs)."""
    import triton.language as tl

    path = checkpoint_factory("llama")
    ps = prompts(seed=8)[:3]  # 3 decoding: padded to 4
    if torch.cuda.is_available():
        llm = LLM(path, device="cuda", dtype="float32", max_num_seqs=4)
        assert llm.engine.runner.graphs is not None  # captured at start-up
    else:
        if type(tl.standard.sum).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported without TRITON_INTERPRET")
        llm = LLM(path, max_num_seqs=4)
        llm.engine.runner.decode_kernel = "triton"
        llm.engine.runner.capture_decode_graphs([1, 2, 4], mode="eager")
    _poison_scratch(llm.engine)
    outs = llm.generate(ps, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert llm.engine.runner.graphs.num_replays > 0
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ps, new=5)


@needs_c_kernel
def test_start_up_capture_skips_what_graphs_do_not_cover(checkpoint_factory, tmp_path):
    """The engine's start-up call captures only with the Triton paged kernel (CUDA), never for linear-attention
    models: elsewhere it leaves decode steps eager."""
    llm = LLM(checkpoint_factory("llama"))
    llm.engine.runner.capture_decode_graphs_if_supported(8, 64)  # the C kernel on CPU: not the CUDA graphs' kernel
    assert llm.engine.runner.graphs is None
    llm.engine.runner.decode_kernel = "triton"
    llm.engine.runner.state_cache = object()  # as a linear-attention model's runner has
    llm.engine.runner.capture_decode_graphs_if_supported(8, 64)
    assert llm.engine.runner.graphs is None
