"""Grammar compiles in a killable child process (packserve.engine.grammar_process): the same grammar as an
in-process compile, compile errors passed through, and a compile that runs past the timeout or crashes the
compiler costs only its own request (the next compile gets a fresh child)."""

from __future__ import annotations

import json
import time

import pytest

xgr = pytest.importorskip("xgrammar")

from packserve.checkpoints import build_tokenizer  # noqa: E402
from packserve.engine.grammar_process import CompileProcess, compile_spec  # noqa: E402
from packserve.engine.request import GuidedSpec, ParameterError  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    proc = CompileProcess(info, timeout=3.0)
    yield info, proc
    proc.close()


@pytest.mark.parametrize("spec,good,bad", [
    (GuidedSpec("regex", "ab+c", "r"), "abbbc", "abd"),
    (GuidedSpec("json_schema", json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                           "required": ["n"]}), "g"), '{"n": 12}', '{"n": "x"}'),
    (GuidedSpec("choice", json.dumps(["yes", "no"]), "c"), "no", "maybe"),
])
def test_child_compiles_the_same_grammar(setup, spec, good, bad):
    info, proc = setup
    local = compile_spec(xgr.GrammarCompiler(info, cache_enabled=False), spec)
    remote = proc.compile(spec)
    for text, want in ((good, True), (bad, False)):
        assert xgr.GrammarMatcher(local).accept_string(text) == xgr.GrammarMatcher(remote).accept_string(text) == want


def test_errors_pass_through(setup):
    _, proc = setup
    with pytest.raises(ParameterError) as e:
        proc.compile(GuidedSpec("regex", "(", "guided_regex"))
    assert e.value.param == "guided_regex" and "does not compile" in e.value.message


@pytest.mark.parametrize("spec,reason", [
    # alternatives of bounded repeats: ~0.4 s each at this vocabulary (past grammar_limits' sum, sent directly)
    (GuidedSpec("json_schema", json.dumps({"type": "string", "pattern": "|".join(
        f"(.{{999}}x{i})" for i in range(40))}), "guided_json"), "within"),
    # nested groups overflow xgrammar's stack: the child dies
    (GuidedSpec("json_schema", json.dumps({"type": "string", "pattern": "(" * 100_000 + ")" * 100_000}),
     "guided_json"), "crashed"),
])
def test_a_runaway_compile_costs_only_its_request(setup, spec, reason):
    _, proc = setup
    t = time.monotonic()
    with pytest.raises(ParameterError) as e:
        proc.compile(spec)
    assert reason in e.value.message and e.value.param == "guided_json"
    assert time.monotonic() - t < 3.0 + 10  # killed at the timeout (or dead sooner)
    assert xgr.GrammarMatcher(proc.compile(GuidedSpec("regex", "ok", "r"))).accept_string("ok")  # a fresh child


def test_the_pool_starts_a_second_child_only_when_compiles_overlap():
    """The server's pool: one child runs from the start; one compile at a time keeps it at one (each holds
    ~300 MB); a compile that arrives while another runs starts the second."""
    import threading

    from packserve.engine.structured import StructuredOutputs

    tok = build_tokenizer()
    so = StructuredOutputs(tok, len(tok), [tok.eos_token_id], compile_timeout=20.0)
    pool = so._pool
    try:
        for i in range(3):
            assert xgr.GrammarMatcher(pool.compile(GuidedSpec("regex", f"a{i}b", "r"))).accept_string(f"a{i}b")
        assert [p.running for p in pool.procs] == [False, True]
        slow = GuidedSpec("json_schema", json.dumps({"type": "string", "pattern": "|".join(
            f"(.{{999}}x{i})" for i in range(3))}), "guided_json")  # ~1 s at this vocabulary
        t = threading.Thread(target=pool.compile, args=(slow,))
        t.start()
        deadline = time.monotonic() + 10
        while pool._free.qsize() == 2 and time.monotonic() < deadline:  # until the slow one holds its child
            time.sleep(0.005)
        assert xgr.GrammarMatcher(pool.compile(GuidedSpec("regex", "x+", "r"))).accept_string("xx")
        t.join(30)
        assert [p.running for p in pool.procs] == [True, True]
    finally:
        for p in pool.procs:
            p.close()
