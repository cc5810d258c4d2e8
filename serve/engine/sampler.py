"""Sampling from last-token logits: penalties, temperature, top-k/top-p/min-p, seeds, logprobs, batched.

Order (as vLLM/transformers): penalties on raw logits -> temperature -> top-k -> top-p
-> min-p -> sample. Greedy (temperature 0) takes the argmax of the penalized logits.
Logprobs are reported from the raw model distribution (log_softmax of the logits).
Per-request seeds use a private torch.Generator, so a seeded request gives the same
tokens whatever else shares its batch.

Every option is a tensor op over all the rows that use it; the only device-to-host
transfers are the sampled token ids (one per step) and, when a row asks for logprobs,
one more for all of them. Per-row work left: each seeded row draws its exponential
noise from its own generator (a launch, not a sync). Which options a step needs is
decided from the requests' parameters on the host, never by reading a device tensor.
tests/engine/sampler_reference.py keeps the per-row version this one must equal.
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


class Sampler:
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
        _apply_penalties(logits, requests)
        _ban_early_stops(logits, requests)

        tokens = self._sample(logits, requests)
        if constrained:
            self.structured.accept([requests[i].matcher for i in constrained], [tokens[i] for i in constrained])
        return SampleResult(tokens, _logprobs(raw, requests, tokens))

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """The token of every row, moved to the host in one transfer."""
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not sampled and cpu_ops.usable(logits):
            return cpu_ops.argmax_rows(logits)  # the first maximal index, like transformers' argmax, in one C pass
        out = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        if greedy:
            rows = logits if not sampled else logits[greedy]
            # max(dim).indices: the first maximal index, at a third of argmax's cost on CPU.
            ids = rows.max(dim=-1).indices
            if not sampled:
                return ids.tolist()
            out[greedy] = ids
        if sampled:
            reqs = [requests[i] for i in sampled]
            probs = _filtered_probs(logits[sampled] if greedy else logits, reqs)
            # Exponential race == categorical sampling: argmax(p / q), q ~ Exp(1). Unseeded rows draw together;
            # a seeded row draws from its own generator, so its tokens do not depend on its neighbours.
            q = torch.empty_like(probs)
            seeded = [k for k, r in enumerate(reqs) if r.params.seed is not None]
            if len(seeded) < len(reqs):
                q.exponential_(1.0)
            for k in seeded:
                q[k].exponential_(1.0, generator=self._generator(reqs[k], logits.device))
            ids = (probs / q).argmax(dim=-1)
            if not greedy:
                return ids.tolist()
            out[sampled] = ids
        return out.tolist()


def _rows_cols(requests: list[Request], items) -> tuple[list[int], list[int]]:
    rows, cols = [], []
    for i, req in enumerate(requests):
        for c in items(req):
            rows.append(i)
            cols.append(c)
    return rows, cols


def _apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    """Every row's logit_bias in one scatter-add (rows without a bias cost nothing)."""
    rows, cols = _rows_cols(requests, lambda r: (tid for tid, _ in r.params.logit_bias))
    if rows:
        vals = [b for r in requests for _, b in r.params.logit_bias]
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits.index_put_(index, torch.tensor(vals, dtype=logits.dtype, device=logits.device), accumulate=True)


def _apply_bad_words(logits: torch.Tensor, requests: list[Request]) -> None:
    """Ban the last token of every bad word whose other tokens end the output so far, for all rows at once."""
    def banned(req):
        out = req.output_token_ids
        for w in req.params.bad_words_ids:
            if len(w) == 1 or (len(out) >= len(w) - 1 and tuple(out[len(out) - len(w) + 1:]) == w[:-1]):
                yield w[-1]

    rows, cols = _rows_cols(requests, banned)
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


def _ban_early_stops(logits: torch.Tensor, requests: list[Request]) -> None:
    """Below min_tokens a row may not stop: its stop token ids (and EOS unless ignored) get -inf, all rows at once."""
    def banned(req):
        p = req.params
        if len(req.output_token_ids) >= p.min_tokens:
            return ()
        return (*p.stop_token_ids, *(() if p.ignore_eos else req.eos_token_ids))

    rows, cols = _rows_cols(requests, banned)
    if rows:
        logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """Repetition (over prompt and output, transformers/vLLM) then presence/frequency (over the output, OpenAI),
    each as one op over the rows that use it."""
    dev, V = logits.device, logits.shape[1]
    rep = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
    if rep:
        rows, cols = _rows_cols([requests[i] for i in rep], lambda r: set(r.all_token_ids))
        seen = torch.zeros(len(rep), V, dtype=torch.bool, device=dev)
        seen[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = True
        pen = torch.tensor([requests[i].params.repetition_penalty for i in rep], device=dev).unsqueeze(1)
        vals = logits[rep]
        # Shrink positive logits, grow negative ones.
        logits[rep] = torch.where(seen, torch.where(vals > 0, vals / pen, vals * pen), vals)
    pf = [i for i, r in enumerate(requests) if (r.params.presence_penalty or r.params.frequency_penalty)
          and r.output_token_ids]
    if pf:
        rows, cols = _rows_cols([requests[i] for i in pf], lambda r: r.output_token_ids)
        counts = torch.zeros(len(pf), V, dtype=logits.dtype, device=dev)
        counts.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                          torch.ones(len(rows), dtype=logits.dtype, device=dev), accumulate=True)
        freq = torch.tensor([requests[i].params.frequency_penalty for i in pf], device=dev).unsqueeze(1)
        pres = torch.tensor([requests[i].params.presence_penalty for i in pf], device=dev).unsqueeze(1)
        logits[pf] -= freq * counts + pres * (counts > 0).to(logits.dtype)
    touched = [i for i, r in enumerate(requests) if r.params.needs_penalties]
    if touched:
        # Extreme penalties (repetition_penalty 1e-300) overflow to +-inf, and a row holding inf turns softmax into
        # NaN; clamped to the finite range the order of the logits, all a penalty means, is kept.
        big = torch.finfo(logits.dtype).max
        logits[touched] = logits[touched].clamp(min=-big, max=big)


def _filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    dev, V = logits.device, logits.shape[-1]
    temps = torch.tensor([r.params.temperature for r in requests], device=dev).unsqueeze(1)
    logits = logits / temps
    ks = [r.params.top_k if 0 < r.params.top_k < V else 0 for r in requests]
    if any(ks):
        # Every row's k-th largest logit from one topk of the largest k; rows without top-k keep all.
        kmax = max(ks)
        kth = logits.topk(kmax, dim=-1).values.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)
                                                      .unsqueeze(1))
        on = torch.tensor([k > 0 for k in ks], device=dev).unsqueeze(1)
        logits = logits.masked_fill(on & (logits < kth), float("-inf"))
    if any(r.params.top_p < 1.0 for r in requests):
        top_p = torch.tensor([r.params.top_p for r in requests], device=dev)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if any(r.params.min_p > 0 for r in requests):
        min_p = torch.tensor([r.params.min_p for r in requests], device=dev).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _logprobs(raw: torch.Tensor, requests: list[Request], tokens: list[int]) -> list:
    """(chosen, top-n) per row that asked, from one log_softmax and one transfer for all of them."""
    out: list = [None] * len(requests)
    want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not want:
        return out
    dev = raw.device
    lp = torch.log_softmax(raw[want] if len(want) < len(requests) else raw, dim=-1)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in want], device=dev).unsqueeze(1))
    nmax = max(requests[i].params.logprobs for i in want)
    parts = [chosen.double()]
    if nmax:
        vals, idx = lp.topk(nmax, dim=-1)
        parts += [vals.double(), idx.double()]  # token ids are exact in float64
    table = torch.cat(parts, dim=1).tolist()
    for row, i in enumerate(want):
        n = requests[i].params.logprobs
        t = table[row]
        top = [Logprob(int(t[1 + nmax + j]), t[1 + j]) for j in range(n)] if n else []
        out[i] = (Logprob(tokens[i], t[0]), top)
    return out
