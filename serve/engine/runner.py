"""Turns a SchedulerOutput into model inputs, runs the model, samples.

Flat token layout of a step: fresh prompts first (bin-packed row by row), then
requests with cached context (chunk continuations and decodes). The model's
matmuls see only real tokens; the last layer past its attention, the final norm
and the logits are computed for the sampled positions only (output_rows).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from packserve import distributed, envs
from packserve.engine.input_batch import InputBatch
from packserve.engine.kv_cache import KVCache
from packserve.engine.packing import build_packed_batch
from packserve.engine.precision import CpuMatmulPrecision
from packserve.engine.sampler import SampleResult, Sampler
from packserve.engine.scheduler import SchedulerOutput, ScheduledRequest
from packserve.kernels import cpu_ops
from packserve.layers import paged_attention_layer as paged
from packserve.layers.linear import prepack_cpu
from packserve.layers.attention import (AttentionBackend, AttentionMetadata, ForwardContext, PackedMeta, row_layout,
                                        segment_causal_mask)
from packserve.layers.paged_attention_layer import PagedMeta


log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StepStats:
    """What one step's packed prefill did (the metrics' histograms and counters)."""

    num_prefill_tokens: int = 0  # fresh prompt tokens (packed)
    num_prompts_packed: int = 0
    packing_efficiency: float = 1.0  # real tokens / slots computed by the attention backend
    padding_avoided: int = 0  # vs one padded batch of the same prompts


class ModelRunner:
    def __init__(self, model, backend: AttentionBackend, kv_cache: KVCache, device: torch.device,
                 packing: str = "ffd", pack_length: int | None = None, state_cache=None, sampler: Sampler | None = None,
                 cpu_precision: CpuMatmulPrecision | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192, tp=None):
        self.model = model
        self.tp = tp  # rank 0 of a tensor-parallel group: packserve.engine.tensor_parallel.TPGroup
        self.cpu_precision = cpu_precision  # CPU: per step, bf16 or exact fp32 matmuls (packserve.engine.precision)
        self.state_cache = state_cache  # linear-attention states (None for pure softmax models)
        self.backend = backend
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self.packing = packing
        self.pack_length = pack_length
        self.sampler = sampler if sampler is not None else Sampler()
        self.max_model_len = max_model_len or kv_cache.num_blocks * kv_cache.block_size
        self.graphs = None  # DecodeGraphs once captured (capture_decode_graphs)
        max_blocks = -(-(max_model_len or kv_cache.num_blocks * kv_cache.block_size) // kv_cache.block_size) + 1
        self.input_batch = InputBatch(max_num_seqs, min(max_blocks, kv_cache.num_blocks), max_num_batched_tokens,
                                      kv_cache.block_size, device)
        # All-decode steps read the paged KV in place instead of gathering it: the C kernel on CPU (fp32), the
        # Triton kernel on CUDA; None keeps the gather + SDPA path.
        self.decode_kernel: str | None = None
        # New tokens behind a cached context read its K/V where it lies (the Triton paged kernel; on CPU the C
        # prefill operator), not from a gathered copy: set with the kernel choice (the engine's prefix-cache bound).
        self.reads_cached_blocks_in_place = False
        # CPU fp32: the C kernels may still be building in the background (cpu_lib); until they load, the torch
        # paths run, and the first step after they do (or this constructor, when they are cached) packs the weights
        # and turns the decode kernel on. This is the one place that packs them.
        self._cpu_kernels_pending = device.type == "cpu" and kv_cache.data.dtype == torch.float32
        self._switch_to_cpu_kernels()
        if device.type == "cuda" and envs.get("GPU_DECODE_KERNEL"):
            self.decode_kernel = "triton"
            self.reads_cached_blocks_in_place = True

    def _switch_to_cpu_kernels(self) -> None:
        if self._cpu_kernels_pending and cpu_ops.available():
            self._cpu_kernels_pending = False
            n = prepack_cpu(self.model)
            log.info("CPU kernels on: decode attention in C, %d weights panel-packed where measured faster", n)
            self.decode_kernel = "cpu"
            self.reads_cached_blocks_in_place = cpu_ops.has_varlen()

    def _packed_meta(self, fresh: list[ScheduledRequest]):
        batch = build_packed_batch([s.token_ids for s in fresh], [s.slot_mapping(self.block_size) for s in fresh],
                                   capacity=self.pack_length, algorithm=self.packing)
        layout = batch.layout
        seq_lens = [layout.lengths[i] for i in layout.order]
        meta = PackedMeta(
            num_tokens=len(batch.token_ids),
            cu_seqlens=torch.tensor(batch.cu_seqlens, dtype=torch.int32).to(self.device, non_blocking=True),
            max_seqlen=max(seq_lens), seq_lens=seq_lens)
        if self.backend.uses_rows:
            row_index, seg = row_layout(batch.row_cu_tokens, batch.segment_ids, layout.capacity)
            meta.num_rows, meta.capacity = layout.num_rows, layout.capacity
            meta.row_index = row_index.to(self.device, non_blocking=True)
            meta.segments = seg.to(self.device, non_blocking=True)
            if self.backend.dense_mask:
                mask = segment_causal_mask(seg)
                # Additive float mask built once per step: SDPA would convert a bool mask in every layer.
                additive = torch.zeros(mask.shape, dtype=self.kv_cache.data.dtype).masked_fill_(~mask, float("-inf"))
                meta.mask = additive.unsqueeze(1).to(self.device, non_blocking=True)
        self.backend.prepare(meta, self.device)
        efficiency = layout.efficiency if self.backend.uses_rows else 1.0
        return batch, meta, efficiency

    def _paged_meta(self, view) -> PagedMeta:
        """Every new token with cached context attends through the block table
        (packserve.layers.paged_attention_layer): the Triton kernel on CUDA; on CPU the C decode kernel and the C
        prefill operator; gather + SDPA without kernels."""
        return paged.build_paged_meta(view, self.block_size, self.decode_kernel or "torch", self.device,
                                      self.kv_cache.data.dtype)

    def _linear_meta(self, seqs: list[ScheduledRequest]):
        from packserve.layers.linear_attention_layer import LinearAttnMeta

        lens = [s.num_new_tokens for s in seqs]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        dev = self.device
        return LinearAttnMeta(
            cu_seqlens=torch.tensor(cu, dtype=torch.int32).to(dev, non_blocking=True), cu_seqlens_host=cu,
            state_slots=torch.tensor([s.request.state_slot for s in seqs], dtype=torch.long).to(dev, non_blocking=True),
            keep_state=torch.tensor([float(s.context_len > 0) for s in seqs]).to(dev, non_blocking=True),
            all_decode=all(n == 1 and s.context_len > 0 for n, s in zip(lens, seqs)))

    def forward(self, out: SchedulerOutput, chunks: list[tuple[int, int, int]] | None = None
                ) -> tuple[torch.Tensor, dict[int, int], StepStats]:
        """The step's forward pass: with tensor parallelism, the step goes to the other ranks first.
        `chunks`: the step's prompt_logprob_chunks, when the caller already has them."""
        if chunks is None:
            chunks = self.prompt_logprob_chunks(out)
        if self.tp is not None:
            self.tp.send(out, chunks)
        self._step_start = time.perf_counter()  # the step's model work on this rank starts (broadcast excluded)
        return self._forward_local(out, chunks)

    def _forward_local(self, out: SchedulerOutput, chunks: list[tuple[int, int, int]]
                       ) -> tuple[torch.Tensor, dict[int, int], StepStats]:
        if out.block_copies:
            self._copy_blocks(out.block_copies)
        return self._forward(out, chunks)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[dict[str, int], dict[str, tuple], StepStats]:
        chunks = self.prompt_logprob_chunks(out)
        hidden, last_index, stats = self.forward(out, chunks)
        self._prompt_logprobs(out, hidden, last_index, chunks)
        to_sample = [k for k, s in enumerate(out.scheduled) if s.sample]
        if not to_sample:
            distributed.step_seconds += time.perf_counter() - self._step_start
            return {}, {}, stats
        logits = self._logits_of(hidden, [last_index[k] for k in to_sample])
        distributed.step_seconds += time.perf_counter() - self._step_start  # forward and logits, as on workers
        reqs = [out.scheduled[k].request for k in to_sample]
        result: SampleResult = self.sampler(logits, reqs)
        tokens = {r.request_id: t for r, t in zip(reqs, result.token_ids)}
        logprobs = {r.request_id: lp for r, lp in zip(reqs, result.logprobs) if lp is not None}
        return tokens, logprobs, stats

    def _copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy-on-write of shared prompt blocks: the leading slots of each source block into its destination, in
        every layer's K and V, in one op."""
        bs = self.block_size
        src = [s * bs + j for s, _, n in copies for j in range(n)]
        dst = [d * bs + j for _, d, n in copies for j in range(n)]
        data = self.kv_cache.data  # [layers, 2, slots, kv heads, head dim]
        idx = torch.tensor(dst, dtype=torch.long, device=data.device)
        data.index_copy_(2, idx, data.index_select(2, torch.tensor(src, dtype=torch.long, device=data.device)))

    @staticmethod
    def prompt_logprob_chunks(out: SchedulerOutput, rows_per_chunk: int = 512) -> list[tuple[int, int, int]]:
        """(entry, first, end) prompt positions to score this step, in slices of rows_per_chunk: for requests that
        asked for prompt logprobs, position j predicting prompt token j + 1, never twice for a recomputed
        (preempted) prompt. Tensor parallel: rank 0 sends the list, so every rank computes the same logits."""
        chunks = []
        for k, s in enumerate(out.scheduled):
            req = s.request
            if req.params.prompt_logprobs is None or s.context_len >= req.num_prompt_tokens:
                continue
            done = len(req.prompt_logprobs) - 1 if req.prompt_logprobs is not None else 0
            first = max(s.context_len, done)
            end = min(s.context_len + s.num_new_tokens, req.num_prompt_tokens - 1)
            chunks += [(k, a, min(end, a + rows_per_chunk)) for a in range(first, end, rows_per_chunk)]
        return chunks

    def _chunk_logits(self, out: SchedulerOutput, hidden: torch.Tensor, last_index: dict[int, int], k: int, a: int,
                      b: int) -> torch.Tensor | None:
        s = out.scheduled[k]
        flat0 = last_index[k] - s.num_new_tokens + 1 - s.context_len  # flat index of position 0
        return self.model.compute_logits(hidden.index_select(0, torch.arange(flat0 + a, flat0 + b,
                                                                             device=hidden.device)))

    def _logits_of(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Logits of hidden's flat `rows`; no copy when output_rows already selected exactly those, in order."""
        if rows != list(range(hidden.shape[0])):
            hidden = hidden.index_select(0, torch.tensor(rows, dtype=torch.long, device=hidden.device))
        return self.model.compute_logits(hidden)

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor, last_index: dict[int, int],
                         chunks: list[tuple[int, int, int]]) -> None:
        """Score prompt tokens for requests that asked (request.prompt_logprobs grows as chunks are prefilled)."""
        from packserve.engine.request import Logprob

        for s in out.scheduled:  # the first prompt token has no logprob (None), even for a 1-token prompt
            if s.request.params.prompt_logprobs is not None and s.request.prompt_logprobs is None:
                s.request.prompt_logprobs = [None]
        for k, a, b in chunks:
            req = out.scheduled[k].request
            n_top = req.params.prompt_logprobs
            lp = torch.log_softmax(self._chunk_logits(out, hidden, last_index, k, a, b).float(), dim=-1)
            ids = req.prompt_token_ids[a + 1:b + 1]
            chosen = lp.gather(1, torch.tensor(ids, device=hidden.device)[:, None])[:, 0].tolist()
            # One transfer per chunk for the top-k too (per-row reads would each wait on the device).
            values, indices = lp.topk(n_top, dim=-1) if n_top else (None, None)
            values, indices = (values.tolist(), indices.tolist()) if n_top else ([[]] * (b - a), [[]] * (b - a))
            for r in range(b - a):
                top = [Logprob(t, v) for v, t in zip(values[r], indices[r])]
                req.prompt_logprobs.append((Logprob(ids[r], chosen[r]), top))

    def worker_step(self, out: SchedulerOutput, chunks: list[tuple[int, int, int]]) -> None:
        """A tensor-parallel worker's step: the forward pass and its share of every logits computation rank 0
        makes (prompt-logprob chunks, then the sampled rows), in the same order."""
        hidden, last_index, _ = self._forward_local(out, chunks)
        for k, a, b in chunks:
            self._chunk_logits(out, hidden, last_index, k, a, b)
        to_sample = [last_index[k] for k, s in enumerate(out.scheduled) if s.sample]
        if to_sample:
            self._logits_of(hidden, to_sample)

    def _forward(self, out: SchedulerOutput, chunks: list[tuple[int, int, int]]
                 ) -> tuple[torch.Tensor, dict[int, int], StepStats]:
        """`chunks`: the step's prompt-logprob chunks (prompt_logprob_chunks; a worker gets rank 0's)."""
        if self._cpu_kernels_pending:
            self._switch_to_cpu_kernels()
        fresh = [s for s in out.scheduled if s.context_len == 0]
        cont = [s for s in out.scheduled if s.context_len > 0]
        last_index: dict[int, int] = {}  # position in out.scheduled -> flat index of its last token
        packed_meta, stats = None, StepStats()
        flat_seqs: list[ScheduledRequest] = []  # sequences in flat token order
        pos_of = {id(s): k for k, s in enumerate(out.scheduled)}
        fresh_inputs: tuple[list[int], list[int], list[int]] = ([], [], [])
        if fresh:
            batch, packed_meta, eff = self._packed_meta(fresh)
            flat_seqs += [fresh[i] for i in batch.seq_order]
            fresh_inputs = (batch.token_ids, batch.position_ids, batch.slot_mapping)
            for i, s in enumerate(fresh):
                last_index[pos_of[id(s)]] = batch.last_token_index[i]
            lens = [s.num_new_tokens for s in fresh]
            stats = StepStats(num_prefill_tokens=len(batch.token_ids), num_prompts_packed=len(fresh),
                              packing_efficiency=eff,
                              padding_avoided=max(lens) * len(lens) - sum(lens))
        # Requests with cached context keep their rows in the persistent batch; the step's inputs are written
        # into its buffers and copied to the device once each.
        order = self.input_batch.update(cont)
        padded = self._graph_bucket(fresh, cont)
        view = self.input_batch.fill(order, *fresh_inputs, pad_to=padded or 0,
                                     scratch_block=self.kv_cache.scratch_block)
        paged_meta = None
        if cont:
            P = len(fresh_inputs[0])
            ends = (P + view.q_host.cumsum() - 1).tolist()
            for s, end in zip(order, ends):
                last_index[pos_of[id(s)]] = end
            flat_seqs += order
        if padded:  # a decode step, replayed from the graph captured for its padded batch size
            if self.cpu_precision is not None:
                self.cpu_precision.apply(padded)
            return self.graphs.replay(padded)[:len(cont)], last_index, stats
        if cont:
            paged_meta = self._paged_meta(view)
        ids, positions, slots = self.input_batch.step_inputs()
        attn = AttentionMetadata(slots, packed_meta, paged_meta)
        ctx = ForwardContext(attn, self.kv_cache, self.backend)
        ctx.output_rows, last_index = self._output_rows(out, last_index, ids.shape[0], bool(chunks))
        if self.state_cache is not None:
            ctx.linear = self._linear_meta(flat_seqs)
            ctx.state_cache = self.state_cache
        if self.cpu_precision is not None:
            self.cpu_precision.apply(ids.shape[0])
        hidden = self.model(ids, positions, ctx)
        return hidden, last_index, stats

    def _output_rows(self, out: SchedulerOutput, last_index: dict[int, int], num_tokens: int,
                     prompt_logprobs: bool):
        """The rows the step reads from the model's output (ForwardContext.output_rows): the sampled ones, in
        scheduled order, with last_index remapped onto them; (None, last_index) when it reads more (prompt
        logprobs) or every row anyway (decode steps). Tensor-parallel ranks decide alike (same step, same chunks)."""
        sampled = [k for k, s in enumerate(out.scheduled) if s.sample]
        if len(sampled) >= num_tokens or prompt_logprobs:
            return None, last_index
        rows = torch.tensor([last_index[k] for k in sampled], dtype=torch.long)
        return rows.to(self.device, non_blocking=True), {k: i for i, k in enumerate(sampled)}

    # -- CUDA graphs of the decode step (packserve.engine.cuda_graphs) -----------------------------------------
    def _graph_bucket(self, fresh: list, cont: list) -> int | None:
        if self.graphs is None or fresh or not cont or any(s.num_new_tokens != 1 for s in cont):
            return None
        padded = self.graphs.bucket(len(cont))
        ib = self.input_batch
        return padded if padded is not None and self.graphs.valid([ib.tokens_dev, ib.rows_dev, ib.table_dev]) \
            else None

    def _static_decode(self, rows: int) -> torch.Tensor:
        """The decode forward over the first `rows` rows of the input batch's device buffers, as written by
        fill(pad_to=rows): the same tensors every call, so a CUDA graph can replay it."""
        ib = self.input_batch
        meta = paged.static_decode_meta(ib.table_dev[:rows], ib.rows_dev[2, :rows], self.block_size,
                                        self.decode_kernel, self.max_model_len)
        ctx = ForwardContext(AttentionMetadata(ib.tokens_dev[2, :rows], None, meta), self.kv_cache, self.backend)
        return self.model(ib.tokens_dev[0, :rows], ib.tokens_dev[1, :rows], ctx)

    def _graphs_cover(self, kernels: tuple[str, ...]) -> bool:
        """Decode graphs cover softmax-attention models on one rank whose paged decode kernel is in `kernels`."""
        return self.state_cache is None and self.tp is None and self.decode_kernel in kernels

    def capture_decode_graphs_if_supported(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        from packserve.engine.cuda_graphs import capture_sizes

        if not self._graphs_cover(("triton",)):
            log.info("decode steps run eagerly: CUDA graphs cover softmax attention on one GPU with the paged kernel")
            return
        self.capture_decode_graphs(capture_sizes(max_num_seqs, max_num_batched_tokens))

    def capture_decode_graphs(self, sizes: list[int], mode: str = "cuda") -> None:
        """Capture the decode forward for each batch size (after the kernels are ready: on CPU the C kernels)."""
        from packserve.engine.cuda_graphs import DecodeGraphs

        if not self._graphs_cover(("triton", "cpu")):
            raise ValueError("decode graphs need a softmax-attention model on one rank with a paged decode kernel")
        ib = self.input_batch
        sizes = [s for s in sizes if s <= min(ib.table.shape[0], ib.tokens.shape[1])]
        graphs = DecodeGraphs(sizes, mode)
        # The buffers hold a valid padded step (every row padding) while the capture runs the forward.
        self.input_batch.update([])
        self.input_batch.fill([], [], [], [], pad_to=sizes[-1], scratch_block=self.kv_cache.scratch_block)
        graphs.capture(self._static_decode, [ib.tokens_dev, ib.rows_dev, ib.table_dev])
        self.graphs = graphs

    @torch.inference_mode()
    def logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Last-token logits of every entry of a step, nothing sampled (LLMEngine.prefill_logits)."""
        hidden, last_index, _ = self.forward(out, [])
        return self._logits_of(hidden, [last_index[k] for k in range(len(out.scheduled))])
