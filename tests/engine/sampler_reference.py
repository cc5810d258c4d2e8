"""The per-row sampler packserve shipped before its batched one (packserve.engine.sampler): the reference the batched
path must equal, option by option, for seeded and greedy rows.

Sampling from last-token logits: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

Order (as vLLM/transformers): penalties on raw logits -> temperature -> top-k -> top-p
-> min-p -> sample. Greedy (temperature 0) takes the argmax of the penalized logits.
Logprobs are reported from the raw model distribution (log_softmax of the logits).
Per-request seeds use a private torch.Generator, so a seeded request gives the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packserve.engine.request import Logprob, Request
from packserve.kernels import cpu_ops


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: (sampled token logprob, top-n) or None.
    logprobs: list[tuple[Logprob, list[Logprob]] | None]


class ReferenceSampler:
    def __init__(self):
        self._generators: dict[str, torch.Generator] = {}
        self.structured = None  # packserve.engine.structured.StructuredOutputs, once a request needs it

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, req: Request, device: torch.device) -> torch.Generator | None:
        if req.params.seed is None:
            return None
        g = self._generators.get(req.request_id)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(req.params.seed)
            self._generators[req.request_id] = g
        return g

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        logits = logits.float()
        raw = logits
        device = logits.device
        # Copy only when a request edits its row (penalties, min_tokens, logit_bias): raw feeds the logprobs.
        if any(r.params.needs_penalties or r.params.logit_bias or r.params.allowed_token_ids or r.params.bad_words_ids
               or len(r.output_token_ids) < r.params.min_tokens for r in requests):
            logits = logits.clone()
        _apply_logit_bias(logits, requests)
        _apply_allowed(logits, requests)
        _apply_bad_words(logits, requests)
        constrained = [i for i, r in enumerate(requests) if r.matcher is not None and not r.matcher.is_terminated()]
        if constrained:
            if logits is raw:
                logits = logits.clone()
            self.structured.apply(logits, constrained, requests)
        for i, req in enumerate(requests):
            p = req.params
            if p.needs_penalties:
                _apply_penalties(logits[i], req, device)
            if len(req.output_token_ids) < p.min_tokens:
                banned = list(p.stop_token_ids)
                if not p.ignore_eos:
                    banned.extend(req.eos_token_ids)
                if banned:
                    logits[i, banned] = float("-inf")

        tokens: list[int] = [0] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        if greedy:
            rows = logits if len(greedy) == len(requests) else logits[greedy]
            # The first maximal index, like transformers' argmax: a C pass on CPU fp32, else max(dim).indices,
            # which is argmax at a third of the cost on CPU.
            ids = cpu_ops.argmax_rows(rows) if cpu_ops.usable(rows) else rows.max(dim=-1).indices.tolist()
            for i, t in zip(greedy, ids):
                tokens[i] = t
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled:
            probs = _filtered_probs(logits[sampled], [requests[i] for i in sampled])
            for row, i in enumerate(sampled):
                g = self._generator(requests[i], device)
                # Exponential race == categorical sampling, and it takes a generator per row.
                q = torch.empty_like(probs[row]).exponential_(1.0, generator=g)
                tokens[i] = int((probs[row] / q).argmax())

        if constrained:
            self.structured.accept([requests[i].matcher for i in constrained], [tokens[i] for i in constrained])

        logprobs: list = [None] * len(requests)
        want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(raw[want], dim=-1)
            for row, i in enumerate(want):
                n = requests[i].params.logprobs
                chosen = Logprob(tokens[i], float(lp[row, tokens[i]]))
                top = []
                if n:
                    vals, idx = lp[row].topk(n)
                    top = [Logprob(int(t), float(v)) for v, t in zip(vals.tolist(), idx.tolist())]
                logprobs[i] = (chosen, top)
        return SampleResult(tokens, logprobs)


def _apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    """Every row's logit_bias in one scatter-add (rows without a bias cost nothing)."""
    rows, cols, vals = [], [], []
    for i, req in enumerate(requests):
        for tid, bias in req.params.logit_bias:
            rows.append(i)
            cols.append(tid)
            vals.append(bias)
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits.index_put_(index, torch.tensor(vals, dtype=logits.dtype, device=logits.device), accumulate=True)


def _apply_bad_words(logits: torch.Tensor, requests: list[Request]) -> None:
    """Ban the last token of every bad word whose other tokens end the output so far, for all rows at once."""
    rows, cols = [], []
    for i, req in enumerate(requests):
        out = req.output_token_ids
        for w in req.params.bad_words_ids:
            if len(w) == 1 or (len(out) >= len(w) - 1 and tuple(out[len(out) - len(w) + 1:]) == w[:-1]):
                rows.append(i)
                cols.append(w[-1])
    if rows:
        logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")


def _apply_allowed(logits: torch.Tensor, requests: list[Request]) -> None:
    """Rows with allowed_token_ids keep only those logits (the rest -inf), all such rows in one masked add."""
    rows = [i for i, r in enumerate(requests) if r.params.allowed_token_ids]
    if not rows:
        return
    mask = torch.full((len(rows), logits.shape[1]), float("-inf"), dtype=logits.dtype, device=logits.device)
    r_idx = [k for k, i in enumerate(rows) for _ in requests[i].params.allowed_token_ids]
    cols = [t for i in rows for t in requests[i].params.allowed_token_ids]
    mask[torch.tensor(r_idx, device=logits.device), torch.tensor(cols, device=logits.device)] = 0.0
    logits[rows] += mask


def _apply_penalties(row: torch.Tensor, req: Request, device: torch.device) -> None:
    p = req.params
    if p.repetition_penalty != 1.0:
        # transformers/vLLM: over prompt and output tokens; shrink positive logits, grow negative ones.
        seen = torch.tensor(sorted(set(req.all_token_ids)), dtype=torch.long, device=device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
        # OpenAI: over generated tokens only.
        out = torch.tensor(req.output_token_ids, dtype=torch.long, device=device)
        counts = torch.bincount(out, minlength=row.numel()).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    # Extreme penalties (repetition_penalty 1e-300) overflow to +-inf, and a row holding inf turns softmax into
    # NaN; clamped to the finite range the order of the logits, all a penalty means, is kept.
    big = torch.finfo(row.dtype).max
    row.clamp_(min=-big, max=big)


def _filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    temps = torch.tensor([r.params.temperature for r in requests], device=logits.device).unsqueeze(1)
    logits = logits / temps
    V = logits.shape[-1]
    for i, r in enumerate(requests):
        k = r.params.top_k
        if 0 < k < V:
            kth = logits[i].topk(k).values[-1]
            logits[i] = logits[i].masked_fill(logits[i] < kth, float("-inf"))
    top_p = torch.tensor([r.params.top_p for r in requests], device=logits.device)
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    min_p = torch.tensor([r.params.min_p for r in requests], device=logits.device).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
