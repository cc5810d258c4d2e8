"""`packserve serve [--model PATH] [...]`: the OpenAI-compatible HTTP server.

Every option has a PACKSERVE_* variable (packserve.envs); the flag wins. With
no model it serves the built-in demo model. SIGTERM/SIGINT: stop admitting
(503), let in-flight requests finish within --shutdown-timeout, abort the rest,
exit 0; a second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from packserve import envs
from packserve.host import cpu_budget

log = logging.getLogger("packserve.serve")


CPU_STEP_TOKENS = 2048  # the server's default step budget on CPU (PACKSERVE_MAX_NUM_BATCHED_TOKENS), vLLM-CPU's too


def _runs_on_cpu(device: str | None) -> bool:
    if device == "cpu":
        return True
    import torch

    return device in (None, "auto") and not torch.cuda.is_available()


def _model_path(args) -> str:
    from packserve import demo

    return args.model if args.model is not None else str(demo.ensure_demo_model(args.cache_dir))


def _engine_config(args, model: str):
    """The engine's configuration from the serve options (rank 0 and torchrun's worker ranks build the same)."""
    from packserve.engine.engine import engine_config

    budget = args.max_num_batched_tokens
    if budget is None:  # latency first on CPU, where a prefill step is slow (see the variable's help)
        budget = max(CPU_STEP_TOKENS, args.max_num_seqs) if _runs_on_cpu(args.device) else 8192
    return engine_config(
        model, backend=args.backend, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget, admission=args.admission_order,
        max_waiting=args.max_waiting, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gib=args.kv_cache_memory_gib, block_size=args.block_size, packing=args.packing,
        norm_mode=args.norm_mode, seed=args.seed, prefix_caching=args.prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager)


def _torchrun_worker(args) -> int:
    """`packserve serve` on a rank > 0 under torchrun: a tensor-parallel worker for rank 0's server."""
    from packserve.config import ConfigError
    from packserve.engine.tensor_parallel import run_torchrun_worker, torchrun_env

    threads = args.num_threads or max(1, cpu_budget() // torchrun_env()[2])
    try:
        return run_torchrun_worker(_engine_config(args, _model_path(args)), threads)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="packserve serve",
                                 description="Serve a model over an OpenAI-compatible HTTP API.")
    for v in envs.options():
        dest = v.flag.lstrip("-").replace("-", "_")
        kw = dict(dest=dest, help=f"{v.help} [{v.env}]", default=None)
        if v.choices:
            kw["choices"] = v.choices
        if v.multiple:
            ap.add_argument(v.flag, action="append", **kw)
        elif v.is_switch:  # a bare flag means on: --enforce-eager, --prefix-caching
            ap.add_argument(v.flag, type=v.type, nargs="?", const=True, **kw)
        else:
            ap.add_argument(v.flag, type=v.type, **kw)
    return ap


def resolve_options(argv: list[str] | None) -> argparse.Namespace:
    """Flags, then PACKSERVE_* variables, then defaults."""
    args = build_parser().parse_args(argv)
    for v in envs.options():
        dest = v.flag.lstrip("-").replace("-", "_")
        if getattr(args, dest) is None:
            setattr(args, dest, v.get())
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = resolve_options(argv)
    except envs.EnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in (("port", args.port), ("max_waiting", args.max_waiting), ("max_n", args.max_n),
                        ("max_body_bytes", args.max_body_bytes), ("batch_window_ms", args.batch_window_ms),
                        ("read_timeout", args.read_timeout), ("max_idle_connections", args.max_idle_connections)):
        if value < (0 if name in ("port", "batch_window_ms") else 1):
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2

    from packserve.engine.tensor_parallel import torchrun_env

    if torchrun_env() is not None and torchrun_env()[0] > 0:  # a worker rank started by torchrun: no HTTP here
        return _torchrun_worker(args)

    from packserve.api.server import bind_socket, run_server

    try:  # before the model loads: a used port fails in a moment, not after the load
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    import torch

    # torch's CPU thread pool belongs to the engine thread (see AsyncEngine): this thread only serves HTTP,
    # and at one torch thread it never starts a second OpenMP pool.
    num_threads = args.num_threads or min(torch.get_num_threads(), cpu_budget())  # cgroup quota, not host cores
    if args.num_threads:  # an explicit count wins over the engine's quota cap
        os.environ["PACKSERVE_NUM_THREADS"] = str(args.num_threads)
    torch.set_num_threads(1)

    from packserve import demo
    from packserve.api.app import ServerState, create_app
    from packserve.config import ConfigError
    from packserve.engine.async_engine import AsyncEngine
    from packserve.engine.engine import LLMEngine
    from packserve.metrics import EngineMetrics

    model = args.model
    is_demo = model is None or demo.is_demo(model)
    if model is None:
        model = str(demo.ensure_demo_model(args.cache_dir))
    if not os.path.isdir(model):
        print(f"error: --model {model!r} is not a checkpoint folder", file=sys.stderr)
        return 2
    name = args.served_model_name or (demo.DEMO_MODEL_NAME if is_demo else os.path.basename(os.path.normpath(model)))

    def build() -> LLMEngine:
        engine = LLMEngine(_engine_config(args, model))
        engine.warm_up()
        return engine

    metrics = EngineMetrics(name)
    aengine = AsyncEngine(factory=build, num_threads=num_threads, on_step=metrics.on_step,
                          on_idle=metrics.set_gauges, batch_window=args.batch_window_ms / 1000)
    try:
        aengine.start()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = aengine.engine
    state = ServerState(engine=aengine, model_name=name, metrics=metrics, max_waiting=args.max_waiting,
                        max_n=args.max_n, api_keys=tuple(args.api_key or ()),
                        allowed_origins=tuple(args.allowed_origin or ()), max_body_bytes=args.max_body_bytes,
                        read_timeout=args.read_timeout,
                        is_demo=is_demo, tool_call_parser=args.tool_call_parser)
    if is_demo:
        log.info("serving the built-in DEMO model %r (random weights, for trying packserve out) from %s",
                 name, model)
    else:
        log.info("serving model %r from %s", name, model)
    log.info("max_model_len %d, max_num_seqs %d, max_waiting %d, auth %s", engine.max_model_len,
             args.max_num_seqs, args.max_waiting, "on" if state.api_keys else "off")
    app = create_app(state)
    return run_server(app, state, sock, args.log_level, args.shutdown_timeout, args.read_timeout,
                      args.max_idle_connections)
