"""The scheduler as a pure state machine: hand-built requests and sampled tokens, no model."""

import pytest

from packserve.config import SchedulerConfig
from packserve.engine.kv_cache import BlockAllocator
from packserve.engine.request import FinishReason, ParameterError, Request, RequestStatus, SamplingParams
from packserve.engine.scheduler import QueueFull, Scheduler
from packserve.engine.stop import token_finish
from tests.support.scheduler_driver import update


def make(num_blocks=64, block_size=4, **kw):
    cfg = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 256, **kw})
    return Scheduler(cfg, BlockAllocator(num_blocks, block_size))


def req(rid, n, max_tokens=4, **kw):
    return Request(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens, temperature=0, **kw),
                   eos_token_ids=(0,))


def run_step(s, token=7):
    out = s.schedule()
    update(s, out, {e.request.request_id: token for e in out.scheduled if e.sample})
    return out


def test_packs_several_prompts_in_one_prefill_then_decodes():
    s = make()
    for i, n in enumerate([5, 9, 3]):
        s.add_request(req(f"r{i}", n))
    out = s.schedule()
    assert [(e.request.request_id, e.num_new_tokens, e.context_len, e.sample) for e in out.scheduled] == [
        ("r0", 5, 0, True), ("r1", 9, 0, True), ("r2", 3, 0, True)]
    assert out.scheduled[1].slot_mapping(4) == [s.requests["r1"].block_ids[j // 4] * 4 + j % 4 for j in range(9)]
    update(s, out, {"r0": 1, "r1": 2, "r2": 3})
    out = s.schedule()
    assert [(e.num_new_tokens, e.context_len) for e in out.scheduled] == [(1, 5), (1, 9), (1, 3)]
    assert [e.token_ids for e in out.scheduled] == [[1], [2], [3]]


def test_finish_on_max_tokens_eos_and_stop_token_frees_blocks():
    s = make()
    s.add_request(req("len", 3, max_tokens=2))
    s.add_request(req("eos", 3))
    s.add_request(req("stop", 3, stop_token_ids=[42]))
    s.add_request(req("ignore", 3, max_tokens=2, ignore_eos=True))
    out = s.schedule()
    update(s, out, {"len": 5, "eos": 0, "stop": 42, "ignore": 0})
    assert s.requests.keys() == {"len", "ignore"}
    out = s.schedule()
    changed = update(s, out, {"len": 5, "ignore": 0})
    assert {r.request_id: r.finish_reason.value for r in changed} == {"len": "length", "ignore": "length"}
    assert not s.has_unfinished() and s.allocator.num_free == s.allocator.num_blocks


def test_update_ends_nothing_the_engine_rule_decides():
    """The scheduler only appends tokens; token_finish (the engine's rule) decides, with its precedence."""
    s = make()
    s.add_request(req("eos", 3))
    out = s.schedule()
    (r,) = s.update(out, {"eos": 0})
    assert not r.is_finished and s.requests["eos"] is r
    assert token_finish(r, 256) == (FinishReason.STOP, None)

    def reason(max_tokens=4, tokens=(7,), max_model_len=256, terminated=False, **kw):
        r = req("x", 3, max_tokens=max_tokens, **kw)
        r.output_token_ids.extend(tokens)
        if terminated:
            r.matcher = type("Done", (), {"is_terminated": lambda self: True})()
        return token_finish(r, max_model_len)

    assert reason() == (None, None)
    assert reason(max_tokens=1, tokens=(0,)) == (FinishReason.STOP, None)  # EOS on the last allowed token: stop
    assert reason(max_tokens=1) == (FinishReason.LENGTH, None)
    assert reason(tokens=(0,), min_tokens=2) == (None, None)  # EOS before min_tokens does not end it
    assert reason(tokens=(7, 0), min_tokens=2) == (FinishReason.STOP, None)
    assert reason(tokens=(0,), ignore_eos=True) == (None, None)
    assert reason(tokens=(42,), ignore_eos=True, stop_token_ids=[42]) == (FinishReason.STOP, 42)
    assert reason(max_tokens=1, terminated=True) == (FinishReason.STOP, None)  # complete output beats length
    assert reason(max_model_len=4) == (FinishReason.LENGTH, None)  # 3 prompt + 1 generated fill the context


def test_token_budget_and_chunked_prefill():
    s = make(max_num_batched_tokens=16)
    s.add_request(req("long", 40))
    s.add_request(req("short", 4))
    chunks = []
    while True:
        out = s.schedule()
        assert out.num_tokens <= 16
        chunks.append([(e.request.request_id, e.num_new_tokens, e.context_len, e.sample) for e in out.scheduled])
        update(s, out, {e.request.request_id: 7 for e in out.scheduled if e.sample})
        if s.requests["long"].output_token_ids:
            break
    assert chunks[0] == [("long", 16, 0, False)]
    assert chunks[1] == [("long", 16, 16, False)]
    assert chunks[2] == [("long", 8, 32, True), ("short", 4, 0, True)]


def test_max_num_seqs_bounds_running():
    s = make(max_num_seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", 3))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 2


def test_preempts_newest_when_blocks_run_out_and_recomputes():
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    s.add_request(req("old", 8, max_tokens=6))  # 2 blocks
    s.add_request(req("new", 7, max_tokens=6))  # 2 blocks
    run_step(s)  # both prefilled: old has 9 tokens (needs 3rd block next), new has 8
    out = s.schedule()
    assert out.preempted == ["new"]
    assert [e.request.request_id for e in out.scheduled] == ["old"]
    new = s.requests["new"]
    assert new.status == RequestStatus.PREEMPTED and new.block_ids == [] and new.num_computed_tokens == 0
    assert new.output_token_ids == [7]  # kept: recomputed from prompt + generated tokens
    update(s, out, {"old": 7})
    # old finishes eventually, then new is re-admitted with its prompt + output as one prefill.
    while "old" in s.requests:
        run_step(s)
    out = s.schedule()
    assert [(e.request.request_id, e.num_new_tokens, e.context_len) for e in out.scheduled] == [("new", 8, 0)]
    update(s, out, {"new": 7})
    while s.has_unfinished():
        run_step(s)
    assert s.allocator.num_free == 4 and s.num_preemptions >= 1


def test_queue_limit_duplicate_ids_and_oversized_requests():
    s = make(max_waiting=2, num_blocks=8, block_size=4)
    s.add_request(req("a", 3))
    with pytest.raises(ParameterError):
        s.add_request(req("a", 3))
    s.add_request(req("b", 3))
    with pytest.raises(QueueFull):
        s.add_request(req("c", 3))
    with pytest.raises(ParameterError, match="KV blocks"):
        make(num_blocks=2, block_size=4).add_request(req("big", 10, max_tokens=4))


def test_abort_waiting_and_running():
    s = make()
    s.add_request(req("run", 5))
    s.add_request(req("wait", 5))
    s.config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=256)
    run_step(s)
    assert s.finish("wait", FinishReason.ABORT)
    assert s.finish("run", FinishReason.ABORT)
    assert not s.has_unfinished() and s.allocator.num_free == s.allocator.num_blocks


def test_block_allocator_refcounts():
    a = BlockAllocator(4, 2)
    b = a.allocate(3)
    a.share(b[0])
    a.free(b)
    assert a.num_free == 3
    a.free([b[0]])
    assert a.num_free == 4
    with pytest.raises(ValueError):
        a.free([b[0]])
    assert a.blocks_for(5) == 3


def _admitted(out):
    return [(e.request.request_id, e.num_new_tokens) for e in out.scheduled if e.context_len == 0]


def test_shortest_first_admission_lets_short_prompts_pass_long_ones():
    """A burst under a small budget: "shortest" starts the short prompts first (their first tokens come a step
    sooner), "fcfs" keeps arrival order (the long head prompt takes the whole budget)."""
    lens = {"long": 40, "a": 6, "b": 3, "c": 9}
    for admission, first in (("shortest", [("b", 3), ("a", 6), ("c", 9), ("long", 14)]), ("fcfs", [("long", 32)])):
        s = make(max_num_batched_tokens=32, admission=admission)
        for rid, n in lens.items():
            s.add_request(req(rid, n))
        assert _admitted(s.schedule()) == first, admission


def test_shortest_first_ages_waiting_requests_and_puts_preempted_ones_first():
    """A long prompt passed by a stream of short ones starts once it has waited aging_steps steps; a preempted
    request is readmitted before shorter newcomers."""
    s = make(max_num_seqs=1, admission="shortest", aging_steps=3)
    s.add_request(req("busy", 2, max_tokens=100))  # holds the only running seat, so the queue only grows
    s.add_request(req("long", 9))
    heads = []
    for step in range(5):
        s.add_request(req(f"short{step}", 3))
        run_step(s)
        heads.append(s._admission_order()[0].request_id)
    # Shorter newcomers go before the long prompt until it has waited 3 steps; then it is first.
    assert heads == ["short0", "short0", "long", "long", "long"]

    s = make(num_blocks=6, block_size=4, max_num_batched_tokens=64, admission="shortest")
    s.add_request(req("big", 8, max_tokens=14))
    s.add_request(req("small", 8, max_tokens=14))
    run_step(s)
    while not s.num_preemptions:  # both grow until the cache is full: the newest running request is preempted
        run_step(s)
    s.add_request(req("tiny", 2, max_tokens=2))
    preempted = next(r for r in s.waiting if r.num_preemptions)
    order = s._admission_order()
    assert order[0] is preempted and order[-1].request_id == "tiny"


def test_admission_order_is_validated():
    with pytest.raises(ValueError, match="admission"):
        SchedulerConfig(admission="random")
    with pytest.raises(ValueError, match="aging_steps"):
        SchedulerConfig(aging_steps=0)


def test_engine_keeps_every_scheduler_setting(checkpoint_factory):
    """engine_config's scheduler options reach the scheduler (the admission order once did not)."""
    from packserve.engine.engine import LLMEngine, engine_config

    engine = LLMEngine(engine_config(checkpoint_factory("llama"), device="cpu", dtype="float32", admission="shortest",
                                     share_prompt=False, max_model_len=128, max_num_seqs=7))
    cfg = engine.scheduler.config
    assert (cfg.admission, cfg.share_prompt, cfg.max_num_seqs, cfg.max_model_len) == ("shortest", False, 7, 128)
