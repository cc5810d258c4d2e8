"""When a request ends: its newest token (`token_finish`) and its text (`StopMatcher`, stop strings).

The engine is the one place that decides (packserve.engine.outputs, after each step); the scheduler only carries the
decision out (`Scheduler.finish` frees the blocks at once). Precedence: a stop string in the text, then EOS / a
stop token id, a completed structured output, then the length limits.

Stop strings are matched incrementally: an Aho-Corasick automaton over one request's stop strings.

The generated text only grows, so the matcher consumes each new character once and keeps one automaton state:
the longest suffix of the text that is a prefix of some stop string. That state is also how much of the text's
tail may still become a stop string (held back from streaming). Per token the cost is the new characters, not
the text or the stop strings' lengths: rescanning every stop string against the text's tail on every token
(the earlier code) let 16 stop strings of 500k characters slow every other request on the engine thread.

When several stop strings end at the same character the longest wins (it starts earliest); the first position
where any stop string ends is where generation stops, as in vLLM.
"""

from __future__ import annotations

from collections import deque

from packserve.engine.request import FinishReason, Request


def token_finish(req: Request, max_model_len: int) -> tuple[FinishReason | None, int | None]:
    """(reason, stop token id or None) when req's newest token ends it (or it generates none), else (None, None)."""
    p, out = req.params, req.output_token_ids
    if not out:  # max_tokens=0: the prompt was scored, nothing generated
        return FinishReason.LENGTH, None
    token = out[-1]
    if len(out) >= p.min_tokens:
        if not p.ignore_eos and token in req.eos_token_ids:
            return FinishReason.STOP, None
        if token in p.stop_token_ids:
            return FinishReason.STOP, token
    if req.matcher is not None and req.matcher.is_terminated():
        return FinishReason.STOP, None  # the output is complete (also under ignore_eos)
    if len(out) >= p.max_tokens or req.num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None, None


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        ends = [-1]  # per state: the stop string ending exactly here (index), or -1
        for i, s in enumerate(stops):
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    depth.append(depth[node] + 1)
                    ends.append(-1)
                node = nxt
            ends[node] = i
        fail = [0] * len(goto)
        hit = list(ends)  # per state: the longest stop string ending here or at a suffix state (-1: none)
        queue = deque(goto[0].values())
        while queue:  # breadth first: a state's fail target is shallower, so already final
            u = queue.popleft()
            for ch, v in goto[u].items():
                f = fail[u]
                while f and ch not in goto[f]:
                    f = fail[f]
                target = goto[f].get(ch, 0)
                fail[v] = target if target != v else 0
                if hit[v] < 0:
                    hit[v] = hit[fail[v]]
                queue.append(v)
        self._goto, self._fail, self._depth, self._hit = goto, fail, depth, hit
        self.state = 0
        self.consumed = 0  # characters of the text fed so far

    def feed(self, text: str) -> tuple[int, str] | None:
        """Consume text[consumed:]; returns (start index, stop string) of the first stop string completed."""
        goto, fail, hit = self._goto, self._fail, self._hit
        node = self.state
        for i in range(self.consumed, len(text)):
            ch = text[i]
            while node and ch not in goto[node]:
                node = fail[node]
            node = goto[node].get(ch, 0)
            if hit[node] >= 0:
                s = self.stops[hit[node]]
                self.state, self.consumed = node, i + 1
                return i + 1 - len(s), s
        self.state, self.consumed = node, len(text)
        return None

    @property
    def holdback(self) -> int:
        """Trailing characters that may still become a stop string (not safe to stream yet)."""
        return self._depth[self.state]
