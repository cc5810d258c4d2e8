"""Continuous-batching scheduler: a pure state machine (no tensors, no model).

Contract
- `add_request(req)` queues a request (FIFO); raises QueueFull when the bounded
  waiting queue is full and ParameterError when it could never fit the cache.
- `schedule()` picks the work of one step under a token budget
  (`max_num_batched_tokens`) and `max_num_seqs`:
    1. every running request gets its next tokens: 1 for a decoding request, the
       next chunk for a request whose prompt is still being prefilled;
       if its KV blocks cannot be allocated, the newest running request is
       preempted (blocks freed, back to the head of the waiting queue, recomputed
       later from prompt + generated tokens);
    2. if nothing was preempted, waiting requests are admitted in order while the
       budget, `max_num_seqs` and free blocks allow; a prompt longer than the
       remaining budget is prefilled in chunks over several steps. The order is
       arrival order (`admission="fcfs"`) or fewest tokens to compute first
       (`"shortest"`), where preempted requests and those waiting
       `aging_steps` steps or more come first, in arrival order.
  Requests with no computed tokens form the packed prefill of the step.
  With prefix caching, a request admitted with nothing computed first takes the
  cached blocks of its longest cached prefix (whole blocks, leaving at least one
  token to compute: its logits give the first output token) when they cover at
  least `min_cached_fraction` of it (configured, or set by the engine from its
  attention path: `min_cached_fraction()`); it then continues from there like a chunked
  prefill. Requests that score their prompt (prompt_logprobs) compute every token.
  Siblings (requests of one `group`: a prompt sampled n times) compute the
  prompt once: the first admitted prefills it, the others wait until its
  prompt is computed, then own its full blocks before the last prompt token
  (ref counted) plus a copy of the block holding that token's predecessors
  (copy-on-write: `SchedulerOutput.block_copies`, applied by the runner before
  the step), and compute only the last prompt token (its logits give their
  own first token).
- `update(out, sampled)` applies the step's sampled token ids
  (request_id -> token id, only for entries with `sample=True`; none for a
  request with max_tokens=0, which only scores its prompt), advances
  computed-token counts and registers newly full blocks in the prefix cache.
  It ends nothing: the engine decides when a request ends
  (packserve.engine.stop) and calls
- `finish(request_id, reason)`: the request's blocks go back to the allocator
  at once (EOS, stop token or string, length, abort).
Invariant: every block a request holds is ref counted (prefix blocks shared by
several); when no request is unfinished every block is free (cached blocks stay
evictable, which counts as free).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from packserve.config import SchedulerConfig
from packserve.engine.kv_cache import BlockAllocator, StateSlotAllocator, block_hashes, slots_for
from packserve.engine.request import FinishReason, ParameterError, Request, RequestStatus


class QueueFull(RuntimeError):
    pass


WAIT = object()  # _sibling_source: not yet


def min_cached_fraction(reads_in_place: bool) -> float:
    """The least share of a request's tokens a cached prefix must cover to be used (the engine's default, from its
    attention path). The rest of the prompt then runs as a continuation through the paged path, outside the
    packed prefill. Where that path reads the cached blocks in place (the Triton paged kernel on CUDA, the C
    prefill operator on CPU): every hit, as vLLM does; on CPU a cached tenth already saved 10% of the time
    (benchmarks/prefix_fraction.py, 2 AMD EPYC cores). The gather + SDPA paths (torch-only CPU, or CUDA with
    PACKSERVE_GPU_DECODE_KERNEL=0) lost below about a third there (1.26x the recomputation at a fifth, 0.90x at
    a third)."""
    return 0.0 if reads_in_place else 1 / 3


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    context_len: int  # tokens already in the KV cache before this step
    sample: bool  # this step completes the known tokens: sample the next one

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_slice(self.context_len, self.context_len + self.num_new_tokens)

    def slot_mapping(self, block_size: int) -> list[int]:
        return slots_for(self.request.block_ids, block_size, self.context_len, self.context_len + self.num_new_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # (source block, destination block, leading slots to copy): K/V copied before this step runs.
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator,
                 state_slots: StateSlotAllocator | None = None):
        self.config = config
        self.allocator = allocator
        # Models with linear-attention layers also need one fixed-size state slot per running request.
        self.state_slots = state_slots
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_steps = 0  # schedule() calls so far (the clock of shortest-first aging)
        # Tokens of admitted requests looked up in the prefix cache (prompt, plus generated tokens when a preempted
        # request is readmitted), and the tokens taken from it.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.groups: dict[str, list[Request]] = {}  # unfinished requests per sibling group
        # None in the config: the engine sets it before each step from its attention path (min_cached_fraction).
        self.min_cached_fraction = config.min_cached_fraction if config.min_cached_fraction is not None else 0.0
        self.shared_prompt_tokens = 0  # prompt tokens siblings took from another sibling's blocks

    # -- queue management -------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ParameterError(f"duplicate request id {req.request_id!r}", "request_id")
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
        worst = self.allocator.blocks_for(min(req.num_prompt_tokens + req.params.max_tokens, self.config.max_model_len))
        if worst > self.allocator.num_blocks:
            raise ParameterError(
                f"request needs up to {worst} KV blocks but the cache has {self.allocator.num_blocks}", "max_tokens")
        self.requests[req.request_id] = req
        req.queued_step = self.num_steps
        self.waiting.append(req)
        if req.group is not None:
            self.groups.setdefault(req.group, []).append(req)

    def reset_counters(self) -> None:
        """Zero the cumulative counters (after a warm-up)."""
        self.num_preemptions = self.prefix_cache_queries = self.prefix_cache_hits = self.shared_prompt_tokens = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.num_steps += 1

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, req.num_computed_tokens + num_new):
                # Free blocks by preempting the newest request (possibly this one).
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
                continue
            out.scheduled.append(self._entry(req, num_new))
            budget -= num_new
            i += 1

        if not out.preempted:
            for req in self._admission_order():
                if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                if self.state_slots is not None and self.state_slots.num_free == 0:
                    break
                source = self._sibling_source(req)
                if source is WAIT:
                    continue  # its sibling is still computing the prompt
                cached = None
                if source is not None:
                    copy = self._share_prompt(req, source)
                else:
                    cached = self._take_cached_prefix(req)
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                if not self._grow(req, req.num_computed_tokens + num_new):
                    self._release(req)  # give the cached prefix back too: admission is all or nothing
                    req.num_computed_tokens = 0
                    break
                if source is not None:
                    self.shared_prompt_tokens += req.num_computed_tokens
                    if copy:
                        out.block_copies.append((copy[0], req.block_ids[copy[1]], copy[2]))
                if cached is not None:
                    self.prefix_cache_queries += req.num_tokens
                    self.prefix_cache_hits += cached
                    if req.num_preemptions == 0:
                        req.num_cached_tokens = cached
                if self.state_slots is not None:
                    req.state_slot = self.state_slots.allocate()
                self.waiting.remove(req)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.scheduled.append(self._entry(req, num_new))
                budget -= num_new
        return out

    def _admission_order(self) -> list[Request]:
        """The waiting requests in the order they are tried (see the contract above)."""
        if self.config.admission == "fcfs" or len(self.waiting) < 2:
            return list(self.waiting)
        old = self.num_steps - self.config.aging_steps
        first = [r for r in self.waiting if r.num_preemptions or r.queued_step <= old]
        rest = [r for r in self.waiting if not (r.num_preemptions or r.queued_step <= old)]
        rest.sort(key=lambda r: r.num_tokens - r.num_computed_tokens)  # stable: ties keep arrival order
        return first + rest

    def _sibling_source(self, req: Request):
        """For a fresh request of a sibling group: a running sibling whose computed tokens cover req's prompt but
        its last token (share from it), WAIT while a sibling is still prefilling it, or None (compute it)."""
        if (req.group is None or not self.config.share_prompt or self.state_slots is not None
                or req.num_computed_tokens or req.num_preemptions or req.params.prompt_logprobs is not None
                or req.num_prompt_tokens < 2):
            return None
        waiting_for = False
        for r in self.groups.get(req.group, ()):
            if r is req or r.status != RequestStatus.RUNNING:
                continue
            if r.num_computed_tokens >= req.num_prompt_tokens - 1:
                return r
            waiting_for = True
        return WAIT if waiting_for else None

    def _share_prompt(self, req: Request, source: Request) -> tuple[int, int, int] | None:
        """Own source's blocks wholly before req's last prompt token and count those tokens as computed. Returns
        the copy-on-write of the block holding the rest of them (source block, index in req's blocks, slots),
        or None when the last prompt token starts a block."""
        bs = self.allocator.block_size
        last = req.num_prompt_tokens - 1
        shared = source.block_ids[:last // bs]
        for b in shared:
            self.allocator.share(b)
        req.block_ids = list(shared)
        req.num_registered_blocks = len(shared) if self.allocator.prefix_caching else 0
        req.num_computed_tokens = last
        return (source.block_ids[len(shared)], len(shared), last % bs) if last % bs else None

    def _take_cached_prefix(self, req: Request) -> int | None:
        """On admission from scratch: own the cached blocks of req's longest cached prefix and count them as
        computed, if they cover at least min_cached_fraction of it. Returns the cached token count used (0: the
        request is prefilled whole), or None when the cache was not consulted."""
        if not self.allocator.prefix_caching or req.num_computed_tokens or req.params.prompt_logprobs is not None:
            return None
        bs = self.allocator.block_size
        hashes = self._hashes(req, (req.num_tokens - 1) // bs)  # keep >= 1 token to compute
        n = self.allocator.num_matching(hashes)
        if n * bs < self.min_cached_fraction * req.num_tokens:
            return 0
        blocks = self.allocator.match(hashes[:n])
        req.block_ids = blocks
        req.num_registered_blocks = len(blocks)
        req.num_computed_tokens = len(blocks) * self.allocator.block_size
        return req.num_computed_tokens

    def _hashes(self, req: Request, n: int) -> list[bytes]:
        """Hashes of req's first n full blocks (computed once, kept on the request)."""
        hs, bs = req.block_hashes, self.allocator.block_size
        if len(hs) < n:
            new = req.token_slice(len(hs) * bs, n * bs)  # only the blocks not hashed yet
            hs.extend(block_hashes(new, bs, 0, n - len(hs), hs[-1] if hs else b""))
        return hs[:n]

    def _register_full_blocks(self, req: Request) -> None:
        full = req.num_computed_tokens // self.allocator.block_size
        if full > req.num_registered_blocks:
            hs = self._hashes(req, full)
            for i in range(req.num_registered_blocks, full):
                self.allocator.register(req.block_ids[i], hs[i])
            req.num_registered_blocks = full

    def _entry(self, req: Request, num_new: int) -> ScheduledRequest:
        ctx = req.num_computed_tokens
        return ScheduledRequest(req, num_new, ctx, sample=ctx + num_new == req.num_tokens)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        need = self.allocator.blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        req.block_ids.extend(self.allocator.allocate(need))
        return True

    def _release(self, req: Request) -> None:
        # Last block first: among cached blocks, a prefix's tail is then evicted before its head (a head
        # evicted first would leave the rest of the chain unreachable).
        self.allocator.free(req.block_ids[::-1])
        req.block_ids = []
        req.num_registered_blocks = 0
        if req.state_slot is not None:
            self.state_slots.free(req.state_slot)
            req.state_slot = None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- results ----------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Apply one step's results; returns the requests that sampled this step (a new token, or the prompt
        scored when max_tokens is 0), for the engine to check whether they end."""
        changed: list[Request] = []
        for entry in out.scheduled:
            req = entry.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += entry.num_new_tokens
            if self.allocator.prefix_caching:
                self._register_full_blocks(req)
            if not entry.sample:
                continue
            if req.params.max_tokens > 0:  # 0: prompt scoring only, nothing is generated
                req.output_token_ids.append(sampled[req.request_id])
            changed.append(req)
        return changed

    def finish(self, request_id: str, reason: FinishReason, stop_reason: int | str | None = None) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self._finish(req, reason, stop_reason)
        return req

    def _finish(self, req: Request, reason: FinishReason, stop_reason: int | str | None) -> None:
        if req.group is not None:
            group = self.groups[req.group]
            group.remove(req)
            if not group:
                del self.groups[req.group]
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self._release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        del self.requests[req.request_id]
