"""Tensor parallelism: one process per rank, the engine in rank 0, every step's inputs broadcast once.

Rank 0 (the engine's process) schedules, samples and detokenizes; ranks 1..N-1 are worker processes started
here (torch.multiprocessing, spawn), each holding its shard of the weights (packserve.distributed: column-parallel
QKV and gate/up, row-parallel output and down projections, heads split, KV heads fewer than the ranks replicated)
and of the KV cache. Per step rank 0 broadcasts one object: each scheduled request's id, cached and new token
counts, new tokens, blocks and preemption count, plus the step's block copies; every rank rebuilds the same
attention metadata from it (the same runner code) and runs its shard; the row-parallel all-reduces keep the
hidden states identical on every rank. The embedding and the LM head are split by vocabulary rows
(packserve.layers.vocab): every rank computes the logits of its slice for the rows rank 0 needs (the sampled
rows, and the prompt-logprob chunks listed in the message) and rank 0 gathers them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from packserve import distributed
from packserve.config import ConfigError

log = logging.getLogger(__name__)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel",
             "PackserveLinearAttentionForCausalLM")
STOP = "stop"
REPORT_SECONDS = 1.0  # how often the ranks' time counters are gathered to rank 0 (one small gather each time)


def check_tensor_parallel(cfg: dict, size: int, device: torch.device) -> None:
    """One-line errors for a split that cannot work, before any process starts."""
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ConfigError(f"tensor parallelism supports {', '.join(SUPPORTED)} so far, not {arch}")
    heads = cfg.get("num_attention_heads") or cfg["n_head"]
    kv = cfg.get("num_key_value_heads") or heads
    mlp = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * cfg["n_embd"]
    if heads % size:
        raise ConfigError(f"tensor_parallel_size {size} must divide the model's {heads} attention heads")
    if kv % size and size % kv:
        raise ConfigError(f"tensor_parallel_size {size} and the model's {kv} KV heads: one must divide the other")
    if mlp % size:
        raise ConfigError(f"tensor_parallel_size {size} must divide the MLP width {mlp}")
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise ConfigError(f"tensor_parallel_size {size} needs {size} GPUs, {torch.cuda.device_count()} visible")


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, ranks on this host) when torchrun's variables are set (ranks started per host, possibly on
    several hosts: MASTER_ADDR / MASTER_PORT name rank 0's), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to build the same engine pieces as rank 0."""

    model: str
    device: str
    dtype: str  # torch dtype name
    max_model_len: int
    norm_mode: str
    backend: str
    block_size: int
    packing: str
    pack_length: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    threads: int


class _Shadow:
    """A worker's view of a request: what the runner reads (blocks, the step's tokens, preemption count)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.block_ids: list[int] = []
        self.num_preemptions = 0
        self.state_slot = None
        self._start, self._tokens = 0, []

    def token_slice(self, start: int, stop: int) -> list[int]:
        assert start == self._start and stop - start <= len(self._tokens), "tokens outside the broadcast step"
        return self._tokens[:stop - start]


@dataclass
class TPGroup:
    """Rank 0's side: starts the workers, broadcasts steps, stops them."""

    size: int
    device: torch.device
    procs: list = field(default_factory=list)
    _last_report: float = 0.0

    @classmethod
    def join(cls, size: int, device: torch.device) -> "TPGroup":
        """Rank 0 of ranks started by torchrun (the others run `worker_main` through `packserve serve`)."""
        env = torchrun_env()
        if env[0] != 0:
            raise ConfigError(f"the engine runs on rank 0; rank {env[0]} runs a worker")
        if env[1] != size:
            raise ConfigError(f"tensor_parallel_size {size} but torchrun's WORLD_SIZE is {env[1]}")
        distributed.init_group(0, size, "env://", device)
        return cls(size=size, device=device)

    @classmethod
    def start(cls, setup: WorkerSetup, size: int) -> "TPGroup":
        """Spawn ranks 1..size-1 and join the group as rank 0 (returns once every rank has joined)."""
        import torch.multiprocessing as mp

        init = f"tcp://127.0.0.1:{distributed.free_port()}"
        ctx = mp.get_context("spawn")
        group = cls(size=size, device=torch.device(setup.device))
        for rank in range(1, size):
            p = ctx.Process(target=worker_main, args=(rank, size, init, setup), daemon=True,
                            name=f"packserve-tp{rank}")
            p.start()
            group.procs.append(p)
        distributed.init_group(0, size, init, torch.device(setup.device))
        return group

    def start_workers(self, num_blocks: int) -> None:
        """The KV cache size rank 0 chose: the workers build theirs and enter their step loop."""
        _broadcast(num_blocks)

    def send(self, out, chunks: list[tuple[int, int, int]]) -> None:
        steps = [(s.request.request_id, s.context_len, s.num_new_tokens, s.sample,
                  s.request.token_slice(s.context_len, s.context_len + s.num_new_tokens), list(s.request.block_ids),
                  s.request.num_preemptions, s.request.state_slot) for s in out.scheduled]
        now = time.monotonic()
        report = now - self._last_report >= REPORT_SECONDS
        _broadcast({"steps": steps, "copies": list(out.block_copies), "chunks": chunks, "report": report})
        if report:  # the totals as of the previous step, on every rank
            self._last_report = now
            distributed.gather_rank_seconds(self.device)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def shutdown(self) -> None:
        try:
            if self.alive():
                _broadcast(STOP)
        except Exception:  # a worker already gone: the collective fails
            pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        distributed.destroy_group()


def run_torchrun_worker(config, threads: int) -> int:
    """A rank > 0 started by torchrun: build the same setup rank 0 does from the same options, then serve steps."""
    from packserve.engine.engine import _context_limit
    from packserve.models.loader import read_config, resolve_dtype

    rank, world, _ = torchrun_env()
    mc, sc, cc = config.model, config.scheduler, config.cache
    device = torch.device(mc.device if mc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    hf_cfg = read_config(mc.model)
    check_tensor_parallel(hf_cfg, world, device)
    limit = _context_limit(hf_cfg)
    setup = WorkerSetup(mc.model, device.type, str(resolve_dtype(mc.dtype, hf_cfg, device)).removeprefix("torch."),
                        min(mc.max_model_len or limit, limit), mc.norm_mode, mc.backend, cc.block_size, sc.packing,
                        sc.pack_length, sc.max_num_seqs, sc.max_num_batched_tokens, threads)
    worker_main(rank, world, "env://", setup)
    return 0


def _broadcast(obj):
    import torch.distributed as dist

    t = time.perf_counter()
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    if distributed.tp_rank() == 0:  # a worker's wait for the next step is mostly idle time, not overhead
        distributed.collective_seconds += time.perf_counter() - t
    return box[0]


def worker_main(rank: int, size: int, init: str, setup: WorkerSetup) -> None:
    """A worker rank: build the model shard, then run every step rank 0 broadcasts until told to stop."""
    logging.basicConfig(level=os.environ.get("PACKSERVE_LOG_LEVEL", "WARNING").upper())
    torch.set_num_threads(setup.threads)
    local = int(os.environ.get("LOCAL_RANK", rank))  # torchrun: the GPU index on this host
    device = torch.device(f"cuda:{local}" if setup.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    distributed.init_group(rank, size, init, device)
    from packserve.engine.kv_cache import KVCache
    from packserve.engine.runner import ModelRunner
    from packserve.engine.scheduler import ScheduledRequest, SchedulerOutput
    from packserve.layers.attention import select_backend
    from packserve.models.loader import load_model

    dtype = getattr(torch, setup.dtype)
    model = load_model(setup.model, device, dtype, setup.max_model_len, setup.norm_mode)
    num_blocks = _broadcast(None)
    info = model.info
    kv = KVCache(info.num_layers, num_blocks, setup.block_size, info.num_kv_heads, info.head_dim, dtype, device)
    state_cache = None
    n_lin = getattr(model, "num_linear_layers", 0)
    if n_lin:  # linear-attention layers: this rank's heads of every request's state (slots numbered by rank 0)
        from packserve.layers.linear_attention_layer import StateCache

        state_cache = StateCache(n_lin, setup.max_num_seqs, *model.linear_state_shape, device)
    runner = ModelRunner(model, select_backend(setup.backend, device, dtype), kv, device, setup.packing,
                         setup.pack_length, state_cache=state_cache, max_model_len=setup.max_model_len,
                         max_num_seqs=setup.max_num_seqs, max_num_batched_tokens=setup.max_num_batched_tokens)
    shadows: dict[str, _Shadow] = {}
    while True:
        msg = _broadcast(None)
        if msg == STOP:
            break
        if msg["report"]:
            distributed.gather_rank_seconds(device)
        t = time.perf_counter()
        scheduled, seen = [], {}
        for rid, ctx, n, sample, tokens, blocks, preemptions, slot in msg["steps"]:
            sh = shadows.get(rid) or _Shadow(rid)
            sh._start, sh._tokens, sh.block_ids, sh.num_preemptions, sh.state_slot = ctx, tokens, blocks, preemptions, slot
            seen[rid] = sh
            scheduled.append(ScheduledRequest(sh, n, ctx, sample))
        shadows = seen  # requests not in this step get a fresh row when they come back
        with torch.inference_mode():
            runner.worker_step(SchedulerOutput(scheduled=scheduled, block_copies=msg["copies"]), msg["chunks"])
        distributed.step_seconds += time.perf_counter() - t
    distributed.destroy_group()
