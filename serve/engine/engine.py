"""The engine: schedule -> run -> update; tokenization here, the outputs' text and ends in packserve.engine.outputs."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from packserve import envs
from packserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from packserve.engine.outputs import OutputProcessor
from packserve.engine.precision import CpuMatmulPrecision
from packserve.engine.threads import ThreadTuner
from packserve.engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks
from packserve.engine.request import (FinishReason, ParameterError, Request, RequestOutput,
                                      SamplingParams, validate_request)
from packserve.engine.runner import ModelRunner, StepStats
from packserve.engine.sampler import Sampler
from packserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput, min_cached_fraction
from packserve.layers.attention import select_backend
from packserve.models.loader import load_model, read_config, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Plain counters and gauges, refreshed by every step, admission and abort; the Prometheus layer
    (packserve.metrics) reads only these."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hits: int = 0  # of those, tokens found (their prefill skipped)
    prompt_tokens: int = 0
    shared_prompt_tokens: int = 0  # prompt tokens of n > 1 siblings taken from a sibling's KV blocks
    generation_tokens: int = 0
    padding_avoided: int = 0
    steps: int = 0
    last_step: StepStats = field(default_factory=StepStats)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        mc = config.model
        torch.manual_seed(mc.seed)
        dev_name = mc.device if mc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev_name)
        # Refused at once (before the model loads) when the CPU cannot do it: packserve.engine.precision.
        self.cpu_precision = (CpuMatmulPrecision(envs.get("CPU_MATMUL_PRECISION")) if self.device.type == "cpu"
                              else None)
        if self.device.type == "cpu":
            from packserve.host import cpu_budget, tune_malloc

            if envs.get("MALLOC_TUNING"):
                tune_malloc()
            # Never more threads than the cgroup quota allows, unless PACKSERVE_NUM_THREADS asks for them.
            if envs.get("NUM_THREADS") is None and torch.get_num_threads() > cpu_budget():
                torch.set_num_threads(cpu_budget())
        # Decode steps pick the thread count that measures faster (a core shared with another process stalls
        # every parallel region): packserve.engine.threads.
        self.thread_tuner = (ThreadTuner(torch.get_num_threads(), torch.set_num_threads)
                             if self.device.type == "cpu" and envs.get("THREAD_TUNING") else None)
        hf_cfg = read_config(mc.model)
        self.dtype = resolve_dtype(mc.dtype, hf_cfg, self.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(mc.model)

        ctx_limit = _context_limit(hf_cfg)
        self.max_model_len = min(mc.max_model_len or ctx_limit, ctx_limit)
        self.tp = self._start_tensor_parallel(hf_cfg) if mc.tensor_parallel_size > 1 else None
        self.model = load_model(mc.model, self.device, self.dtype, self.max_model_len, mc.norm_mode)
        self.info = self.model.info

        cc = config.cache
        num_blocks = self._num_blocks(cc, config.scheduler)
        if self.tp is not None:
            self.tp.start_workers(num_blocks)
        n_lin = getattr(self.model, "num_linear_layers", 0)
        # Linear-attention state is per request, not per block: such models run without prefix caching.
        self.allocator = BlockAllocator(num_blocks, cc.block_size, prefix_caching=cc.prefix_caching and not n_lin)
        self.kv_cache = KVCache(self.info.num_layers, num_blocks, cc.block_size, self.info.num_kv_heads,
                                self.info.head_dim, self.dtype, self.device)
        # Every scheduler setting as configured (admission order included), with the model's context length.
        self.scheduler_config = sc = dataclasses.replace(config.scheduler, max_model_len=self.max_model_len)
        # Linear-attention layers keep a fixed-size state per running request: one slot each.
        self.state_cache, state_slots = None, None
        if n_lin:
            from packserve.engine.kv_cache import StateSlotAllocator
            from packserve.layers.linear_attention_layer import StateCache

            hkv, dk, dv = self.model.linear_state_shape
            state_slots = StateSlotAllocator(sc.max_num_seqs)
            self.state_cache = StateCache(n_lin, sc.max_num_seqs, hkv, dk, dv, self.device)
        self.state_slots = state_slots
        self.scheduler = Scheduler(self.scheduler_config, self.allocator, state_slots)
        self.backend = select_backend(mc.backend, self.device, self.dtype)
        self.sampler = Sampler()  # the engine's: per-request generators and the grammar compiler live on it
        self.runner = ModelRunner(self.model, self.backend, self.kv_cache, self.device, sc.packing, sc.pack_length,
                                  state_cache=self.state_cache, sampler=self.sampler,
                                  cpu_precision=self.cpu_precision, max_model_len=self.max_model_len,
                                  max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
                                  tp=self.tp)
        self._update_cached_fraction()
        if self.device.type == "cuda" and not mc.enforce_eager:  # before any request (packserve.engine.cuda_graphs)
            self.runner.capture_decode_graphs_if_supported(sc.max_num_seqs, sc.max_num_batched_tokens)
        eos = self.info.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos_ids))
        # Text, logprobs and when each request ends (packserve.engine.outputs).
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler, self.sampler, self.max_model_len)
        self._ids = itertools.count()
        self._structured_lock = threading.Lock()  # the API thread compiles grammars too
        self.stats = EngineStats()
        log.info("engine ready: %s on %s/%s, backend %s, %d KV blocks of %d tokens, max_model_len %d",
                 self.info.architecture, self.device, self.dtype, self.backend.name, num_blocks, cc.block_size,
                 self.max_model_len)

    def _start_tensor_parallel(self, hf_cfg: dict):
        """Check the split, spawn ranks 1..N-1 and join them as rank 0 (packserve.engine.tensor_parallel). On CPU
        the N processes share the cores: each takes its share of this process's threads."""
        from packserve.engine.tensor_parallel import TPGroup, WorkerSetup, check_tensor_parallel, torchrun_env

        mc, sc, cc = self.config.model, self.config.scheduler, self.config.cache
        size = mc.tensor_parallel_size
        check_tensor_parallel(hf_cfg, size, self.device)
        env = torchrun_env()
        threads = max(1, torch.get_num_threads() // (env[2] if env else size))  # the ranks on this host share it
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
            self.thread_tuner = None  # one rank changing its thread count alone would unbalance the group
        setup = WorkerSetup(mc.model, self.device.type, str(self.dtype).removeprefix("torch."), self.max_model_len,
                            mc.norm_mode, mc.backend, cc.block_size, sc.packing, sc.pack_length, sc.max_num_seqs,
                            sc.max_num_batched_tokens, threads)
        log.info("tensor parallel: %d ranks (%d threads each on CPU)%s", size, threads,
                 ", started by torchrun" if env else "")
        return TPGroup.join(size, self.device) if env else TPGroup.start(setup, size)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op without them)."""
        if self.tp is not None:
            self.tp.shutdown()
            self.tp = None

    def _num_blocks(self, cc: CacheConfig, sc: SchedulerConfig) -> int:
        per_block = KVCache.bytes_per_block(self.info.num_layers, cc.block_size, self.info.num_kv_heads,
                                            self.info.head_dim, torch.tensor([], dtype=self.dtype).element_size())
        # Never more than every running request at full context could use.
        useful = sc.max_num_seqs * -(-self.max_model_len // cc.block_size)
        if cc.num_blocks is not None:
            return cc.num_blocks
        if per_block == 0:  # no softmax-attention layer: blocks are bookkeeping only
            return useful
        if cc.memory_gib is not None:
            budget = cc.memory_gib * 2**30
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = 0.85 * free - 2 * 2**30  # leave room for activations
        else:
            budget = 2 * 2**30
        n = int(budget // per_block)
        if n < 1:
            raise RuntimeError("no memory left for the KV cache; lower max_model_len or raise the cache budget")
        return max(1, min(n, useful))

    def warm_up(self) -> None:
        """One dummy prefill of a full step's token budget on the idle engine (the server runs it before it
        reports ready, as vLLM's start-up profile run does): allocators reach their high-water mark, lazy
        kernels compile and the first real batch runs at steady-state speed. Then a few short requests decode
        together (greedy and sampled), so the decode kernels and the sampler are warm too. Counters are zeroed
        afterwards and the prefix cache emptied: the server starts as if nothing had run."""
        if self.has_unfinished():
            raise RuntimeError("warm_up needs an idle engine")
        sc = self.scheduler_config
        budget, blocks, bs = sc.max_num_batched_tokens, self.allocator.num_blocks, self.allocator.block_size
        lengths: list[int] = []
        while budget > 0 and blocks > 0 and len(lengths) < sc.max_num_seqs:
            lengths.append(min(budget, self.max_model_len, blocks * bs))
            budget -= lengths[-1]
            blocks -= self.allocator.blocks_for(lengths[-1])
        if self.state_cache is not None:
            lengths = lengths[:self.state_cache.num_slots]
        tok = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.prefill_logits([[tok] * n for n in lengths])
        for i in range(min(sc.max_num_seqs, 4)):
            self.add_request([tok] * (i + 2), SamplingParams(max_tokens=3, temperature=1.0 if i % 2 else 0.0,
                                                             ignore_eos=True), request_id=f"_warm_up_{i}")
        while self.has_unfinished():
            self.step()
        self.allocator.reset_prefix_cache()
        self.stats = EngineStats()
        self.scheduler.reset_counters()

    def prefill_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Last-token logits of fresh prompts in one packed step, outside the scheduler's step budget (warm-up,
        tests, benchmarks). Only on an idle engine; the prompts hold real blocks (and state slots) for the step,
        so cached prefixes survive unless the allocator evicts them for it."""
        if self.has_unfinished():
            raise RuntimeError("prefill_logits needs an idle engine")
        sched, held = SchedulerOutput(), []
        try:
            for i, p in enumerate(prompts):
                req = Request(f"_prefill_{i}", list(p), SamplingParams(max_tokens=1))
                req.block_ids = self.allocator.allocate(self.allocator.blocks_for(len(p)))
                held.append(req)
                if self.state_slots is not None:
                    req.state_slot = self.state_slots.allocate()
                sched.scheduled.append(ScheduledRequest(req, len(p), 0, True))
            return self.runner.logits(sched)
        except OutOfBlocks:
            raise ValueError("the prompts do not fit the KV cache (or the linear-attention state slots)") from None
        finally:
            for req in held:
                self.allocator.free(req.block_ids)
                if req.state_slot is not None:
                    self.state_slots.free(req.state_slot)

    # -- requests -----------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    prompt_token_ids: list[int] | None = None, group: str | None = None) -> str:
        """Validate and queue a request. Raises ParameterError (bad input) or QueueFull. Requests of one group
        (a prompt sampled several times) compute their common prompt once."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ParameterError("params must be a SamplingParams", "params")
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenize(prompt)
        validate_request(ids, params, self.info.vocab_size, self.max_model_len)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, list(ids), params, arrival_time=arrival_time or time.monotonic(),
                      eos_token_ids=self.eos_token_ids, group=group)
        if params.structured is not None:
            req.matcher = self.structured_outputs().matcher(params.structured)  # ParameterError if it fails
        self.scheduler.add_request(req)
        self.outputs.add(req, prompt if isinstance(prompt, str) else None)
        self._refresh_stats(self.stats.last_step)  # the waiting gauge moves at once
        return rid

    def grammar_compiled(self, spec) -> bool:
        """Whether spec's grammar is compiled and cached (cheap: never builds the compiler)."""
        so = self.sampler.structured
        return so is not None and so.is_compiled(spec)

    def structured_outputs(self, compile_timeout: float | None = None):
        """The grammar compiler for this model (built on first use; packserve.engine.structured). The server
        passes compile_timeout on its first call: compiles then run in child processes killed past it."""
        with self._structured_lock:
            if self.sampler.structured is None:
                if self.tokenizer is None:
                    raise ParameterError("structured outputs need the model's tokenizer", "response_format")
                from packserve.engine.structured import StructuredOutputs

                threads = 1 if self.device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))
                self.sampler.structured = StructuredOutputs(self.tokenizer, self.info.vocab_size,
                                                            sorted(self.eos_token_ids), threads, compile_timeout)
            return self.sampler.structured

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.finish(request_id, FinishReason.ABORT)
        out = self.outputs.abort(request_id)
        self._refresh_stats(self.stats.last_step)  # gauges (KV usage, queues) move at once
        return out if req is not None else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -----------------------------------------------------------
    def _update_cached_fraction(self) -> None:
        """Unless configured, the prefix-cache bound follows the attention path, which changes on CPU when the C
        kernels finish building in the background."""
        if self.scheduler_config.min_cached_fraction is None:
            self.scheduler.min_cached_fraction = min_cached_fraction(self.runner.reads_cached_blocks_in_place)

    def step(self) -> list[RequestOutput]:
        self._update_cached_fraction()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self._refresh_stats(StepStats())
            return []
        now = time.monotonic()
        for s in sched.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
                self.stats.prompt_tokens += s.request.num_prompt_tokens
        decode = all(s.context_len and s.num_new_tokens == 1 for s in sched.scheduled)
        if self.thread_tuner is not None:
            self.thread_tuner.before_step(decode, len(sched.scheduled))
        t0 = time.perf_counter()
        tokens, logprobs, step_stats = self.runner.execute(sched)
        if self.thread_tuner is not None and decode:
            self.thread_tuner.observe(len(sched.scheduled), time.perf_counter() - t0)
        changed = self.scheduler.update(sched, tokens)
        outputs = [self.outputs.on_token(req, logprobs.get(req.request_id)) for req in changed]
        self.stats.generation_tokens += len(changed)
        self.stats.padding_avoided += step_stats.padding_avoided
        self.stats.steps += 1
        self._refresh_stats(step_stats)
        return outputs

    def _refresh_stats(self, step_stats: StepStats) -> None:
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_usage = self.allocator.usage
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries = self.scheduler.prefix_cache_queries
        s.prefix_cache_hits = self.scheduler.prefix_cache_hits
        s.shared_prompt_tokens = self.scheduler.shared_prompt_tokens
        s.last_step = step_stats


def _context_limit(cfg: dict) -> int:
    from packserve.models.llama import max_positions

    if "n_positions" in cfg:
        return int(cfg["n_positions"])
    return max_positions(cfg)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a checkpoint without tokenizer files still serves token ids
        log.warning("no tokenizer loaded from %s (%s); token-id prompts only", path, type(exc).__name__)
        return None


def engine_config(model: str, **kw) -> EngineConfig:
    """Build an EngineConfig from flat keyword options (the offline API and the CLI share this)."""
    from packserve import envs

    # PACKSERVE_DEVICE sets the default device for the offline API too (the test suite pins it to cpu).
    mc = ModelConfig(model=model, dtype=kw.pop("dtype", "auto"), device=kw.pop("device", None) or envs.get("DEVICE"),
                     backend=kw.pop("backend", "auto"), max_model_len=kw.pop("max_model_len", None),
                     norm_mode=kw.pop("norm_mode", "native"), seed=kw.pop("seed", 0),
                     tensor_parallel_size=kw.pop("tensor_parallel_size", 1),
                     enforce_eager=kw.pop("enforce_eager", False))
    cc = CacheConfig(block_size=kw.pop("block_size", 16), num_blocks=kw.pop("num_kv_blocks", None),
                     memory_gib=kw.pop("kv_cache_memory_gib", None), prefix_caching=kw.pop("prefix_caching", True))
    sc = SchedulerConfig(max_num_seqs=kw.pop("max_num_seqs", SchedulerConfig.max_num_seqs),
                         max_num_batched_tokens=kw.pop("max_num_batched_tokens",
                                                       SchedulerConfig.max_num_batched_tokens),
                         max_model_len=max(2, mc.max_model_len or 2), packing=kw.pop("packing", "ffd"),
                         pack_length=kw.pop("pack_length", None), max_waiting=kw.pop("max_waiting", None),
                         admission=kw.pop("admission", "fcfs"), share_prompt=kw.pop("share_prompt", True),
                         min_cached_fraction=kw.pop("min_cached_fraction", None))
    if kw:
        raise TypeError(f"unknown engine options: {sorted(kw)}")
    return EngineConfig(mc, cc, sc)
