"""The PACKSERVE_* registry, CLI option resolution, the demo model, and AsyncEngine internals."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from packserve import envs
from packserve.commands.serve import build_parser, main, resolve_options


def test_every_cli_option_has_a_variable():
    flags = {a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    assert flags == {v.flag for v in envs.options()}
    for v in envs.options():
        assert v.env.startswith("PACKSERVE_") and v.help
    assert {"PACKSERVE_PORT", "PACKSERVE_API_KEY", "PACKSERVE_MAX_WAITING", "PACKSERVE_SHUTDOWN_TIMEOUT",
            "PACKSERVE_MODEL"} <= {v.env for v in envs.options()}


def test_precedence_flag_env_default(monkeypatch):
    assert resolve_options([]).port == 8000
    monkeypatch.setenv("PACKSERVE_PORT", "9001")
    monkeypatch.setenv("PACKSERVE_API_KEY", "a, b")
    monkeypatch.setenv("PACKSERVE_SHUTDOWN_TIMEOUT", "2.5")
    args = resolve_options([])
    assert (args.port, args.api_key, args.shutdown_timeout) == (9001, ["a", "b"], 2.5)
    args = resolve_options(["--port", "9002", "--api-key", "c", "--api-key", "d"])
    assert (args.port, args.api_key) == (9002, ["c", "d"])
    assert envs.get("PORT") == 9001 and envs.get("PACKSERVE_PORT") == 9001


def test_bad_variables_are_rejected(monkeypatch, capsys):
    monkeypatch.setenv("PACKSERVE_PORT", "eighty")
    with pytest.raises(envs.EnvError, match="PACKSERVE_PORT"):
        envs.get("PORT")
    assert main([]) == 2 and "PACKSERVE_PORT" in capsys.readouterr().err
    monkeypatch.setenv("PACKSERVE_PORT", "80")
    monkeypatch.setenv("PACKSERVE_BACKEND", "magic")
    with pytest.raises(envs.EnvError, match="one of"):
        envs.get("BACKEND")


def test_missing_model_folder_is_a_clean_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_demo_model_is_built_once(tmp_path):
    from packserve import demo

    p = demo.ensure_demo_model(tmp_path)
    assert demo.is_demo(p) and (p / "config.json").is_file() and (p / "tokenizer.json").is_file()
    stamp = (p / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo_model(tmp_path) == p
    assert (p / "model.safetensors").stat().st_mtime_ns == stamp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(p)
    assert tok.decode(tok.encode("café 日本語")) == "café 日本語" and tok.chat_template


def test_serve_without_model_serves_the_demo(tmp_path, helpers):
    srv = helpers["ServerProcess"](["--num-threads", "1", "--log-level", "info"], tmp_path,
                                   env={"PACKSERVE_CACHE_DIR": str(tmp_path / "cache")}, port_via_env=True)
    try:
        srv.wait_ready()
        data = httpx.get(srv.url + "/v1/models").json()["data"]
        assert data[0]["id"] == "packserve-demo" and data[0]["demo"] is True
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
        assert "DEMO model" in srv.log()
    finally:
        srv.stop()
    assert srv.proc.returncode == 0


# -- AsyncEngine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model):
    from packserve.engine.engine import LLMEngine, engine_config

    return LLMEngine(engine_config(tiny_model, device="cpu", dtype="float32", max_model_len=128, max_waiting=3,
                                   max_num_seqs=1))


def test_async_engine_idle_does_not_spin_and_submission_is_all_or_none(engine):
    from packserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineRequest
    from packserve.engine.request import SamplingParams
    from packserve.engine.scheduler import QueueFull

    ae = AsyncEngine(engine)
    ae.start()
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(0.5)
        assert time.process_time() - cpu0 < 0.1 * (time.monotonic() - t0)  # asleep on an Event

        ids = engine.tokenize("Hello world")
        sp = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

        async def scenario():
            first = await ae.submit([EngineRequest("a", ids, sp)])  # runs (max_num_seqs=1)
            await first.__anext__()
            # 4 requests do not fit a waiting queue of 3: none of them is queued.
            with pytest.raises(QueueFull):
                await ae.submit([EngineRequest(f"b{i}", ids, sp) for i in range(4)])
            assert len(engine.scheduler.waiting) == 0
            second = await ae.submit([EngineRequest("c", ids, SamplingParams(max_tokens=3, temperature=0))])
            first.abort()
            outs = [o async for o in first]
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
            last = [o async for o in second][-1]
            assert last.finished and len(last.outputs[0].token_ids) == 3

        asyncio.run(scenario())
        assert engine.allocator.num_used == 0
    finally:
        ae.stop()
    assert not ae.alive

    async def after_stop():
        with pytest.raises(EngineDeadError):
            await ae.submit([EngineRequest("z", ids, sp)])

    asyncio.run(after_stop())


@pytest.mark.parametrize("window", [5.0, 0.0])
def test_batch_window_packs_a_burst_into_one_prefill(tiny_model, monkeypatch, window):
    """On an idle engine, requests arriving close together (here 20 ms apart, under a 200 ms gap) are packed
    into the first prefill step; without a window the first one starts alone."""
    from packserve.engine import async_engine
    from packserve.engine.async_engine import AsyncEngine, EngineRequest
    from packserve.engine.engine import LLMEngine, engine_config
    from packserve.engine.request import SamplingParams

    monkeypatch.setattr(async_engine, "GATHER_GAP", 0.2)
    engine = LLMEngine(engine_config(tiny_model, device="cpu", dtype="float32", max_model_len=128, max_num_seqs=8))
    packed = []
    ae = AsyncEngine(engine, on_step=lambda e, outs, now: packed.append(e.stats.last_step.num_prompts_packed),
                     batch_window=window)
    ae.start()
    try:
        sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

        async def scenario():
            for round_ in range(2):  # the second burst arrives at an idle engine again
                streams = []
                for i in range(5):
                    streams.append(await ae.submit([EngineRequest(f"r{round_}-{i}", [5 + i] * (3 + i), sp)]))
                    await asyncio.sleep(0.02)
                for s in streams:
                    assert [o async for o in s][-1].finished

        asyncio.run(scenario())
    finally:
        ae.stop()
    prefill_steps = [n for n in packed if n]
    if window:
        assert prefill_steps == [5, 5]
    else:
        assert prefill_steps[0] < 5 and len(prefill_steps) > 2  # started before the burst was complete
