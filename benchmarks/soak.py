"""Soak: normal clients alone, then the same clients under a mixed hostile load, against one `packserve serve`.

Normal load: `--clients` closed-loop clients streaming completions (64-token prompts, 32 new tokens, greedy).
Hostile load, all at once for the second phase (localhost only, bounded):
- idle sockets: `--idle` connections that send half a request's headers and stop (reopened when closed);
- slow bodies: connections that announce 1 KB and send 10 bytes;
- a chat of 100,000 tiny messages, a 6.7 MB token-id prompt, 16 stop strings of 1,024 characters with n=16,
  lone surrogates, booleans as token ids, both Transfer-Encoding and Content-Length, invalid JSON, 100,000
  stop_token_ids, 100,000 bad_words, grammar specs that compiled for minutes or crashed xgrammar
  ("[a-z]{1,30000}", 30,000 nested groups, JSON nested 5,000 deep), and a legal non-streamed response of
  4 prompts x n=4 echoed with 20 logprobs per token: in turns.
Reports the normal requests' errors and TTFT / end-to-end p50 and p99 in each phase (hostile vs clean), the
hostile requests' status codes, and the server's RSS over time.

  python benchmarks/soak.py [--minutes 10] [--clients 4] [--idle 600] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from server_process import free_port  # noqa: E402  (tests/support: the test harness)


async def normal_client(url: str, stop_at: float, out: list, errors: collections.Counter) -> None:
    body = {"prompt": list(range(10, 74)), "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while time.monotonic() < stop_at:
            t0, ttft = time.monotonic(), None
            try:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors[f"http_{r.status_code}"] += 1
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and ttft is None:
                            ttft = time.monotonic() - t0
                out.append((ttft or 0.0, time.monotonic() - t0))
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1


async def idle_sockets(port: int, n: int, stop_at: float, stats: collections.Counter) -> None:
    async def one():
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                await writer.drain()
                await asyncio.wait_for(reader.read(), timeout=max(0.1, stop_at - time.monotonic()))
                stats["idle_closed_by_server"] += 1
                writer.close()
            except (asyncio.TimeoutError, OSError):
                await asyncio.sleep(0.5)
    await asyncio.gather(*(one() for _ in range(n)))


def hostile_requests() -> list[tuple[str, dict | None, bytes | None, dict]]:
    """(path, json, raw body, headers) per hostile request kind."""
    return [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 100_000, "max_tokens": 2}, None,
         {}),
        ("/v1/completions", {"prompt": [7] * 1_100_000, "max_tokens": 1}, None, {}),
        ("/v1/completions", {"prompt": "hello " * 20, "max_tokens": 16, "n": 16, "stop": ["ab" * 512] * 16}, None,
         {}),
        ("/v1/completions", None, json.dumps({"prompt": "abc \ud800", "max_tokens": 2}).encode(),
         {"Content-Type": "application/json"}),
        ("/v1/completions", {"prompt": [True], "max_tokens": 2}, None, {}),
        ("/v1/completions", None, b"{not json", {"Content-Type": "application/json"}),
        # Amplifiers (refused before any per-step, tokenizing or compile work), and one heavy legal response.
        ("/v1/completions", {"prompt": "hi", "max_tokens": 200, "stop_token_ids": list(range(100_000))}, None, {}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "bad_words": [f"w{i}" for i in range(100_000)]},
         None, {}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "guided_json": {"type": "string",
                                                                             "pattern": "[a-z]{1,30000}"}}, None, {}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "guided_json": {"type": "string",
                                                                             "pattern": "(" * 30000 + ")" * 30000}},
         None, {}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "guided_json": "[" * 5000 + "]" * 5000}, None, {}),
        ("/v1/completions", {"prompt": [[7] * 500] * 4, "n": 4, "echo": True, "logprobs": 20, "max_tokens": 1},
         None, {}),
    ]


async def hostile_loop(url: str, port: int, stop_at: float, stats: collections.Counter) -> None:
    kinds = hostile_requests()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        i = 0
        while time.monotonic() < stop_at:
            path, body, raw, headers = kinds[i % len(kinds)]
            try:
                r = await client.post(path, json=body, content=raw, headers=headers)
                stats[f"hostile_{r.status_code}"] += 1
            except httpx.HTTPError as exc:
                stats[f"hostile_{type(exc).__name__}"] += 1
            try:  # raw-socket kinds: both framings, and a body that stops arriving
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                payload = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                           b"Content-Length: 5\r\n\r\n0\r\n\r\n") if i % 2 else (
                          b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
                writer.write(payload)
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), timeout=60)
                stats[f"raw_{data[9:12].decode() or 'closed'}"] += 1
                writer.close()
            except (asyncio.TimeoutError, OSError) as exc:
                stats[f"raw_{type(exc).__name__}"] += 1
            i += 1
            await asyncio.sleep(1.0)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def phase(url: str, port: int, pid: int, seconds: float, clients: int, idle: int, hostile: bool) -> dict:
    stop_at = time.monotonic() + seconds
    done: list = []
    errors: collections.Counter = collections.Counter()
    stats: collections.Counter = collections.Counter()
    rss: list[tuple[float, float]] = []

    async def sample_rss():
        t0 = time.monotonic()
        while time.monotonic() < stop_at:
            rss.append((time.monotonic() - t0, rss_mb(pid)))
            await asyncio.sleep(5)

    tasks = [normal_client(url, stop_at, done, errors) for _ in range(clients)] + [sample_rss()]
    if hostile:
        tasks += [idle_sockets(port, idle, stop_at, stats), hostile_loop(url, port, stop_at, stats)]
    await asyncio.gather(*tasks)

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] * 1e3 if len(xs) >= 2 else float("nan")
    ttft, e2e = [d[0] for d in done], [d[1] for d in done]
    return {"requests": len(done), "errors": dict(errors), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99), "hostile": dict(stats),
            "rss_mb": [round(x[1]) for x in rss]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the hostile phase")
    ap.add_argument("--clean-minutes", type=float, default=None, help="clean phase (default: a third of --minutes)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--idle", type=int, default=600)
    ap.add_argument("--model", default=None, help="checkpoint (default: the built-in demo model)")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "packserve", "serve", "--port", str(port), "--log-level", "warning",
           "--device", "cpu"] + (["--model", args.model] if args.model else [])
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONSAFEPATH": "1"})
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(Path(log.name).read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        clean_s = 60 * (args.clean_minutes if args.clean_minutes is not None else args.minutes / 3)
        clean = asyncio.run(phase(url, port, proc.pid, clean_s, args.clients, 0, hostile=False))
        hostile = asyncio.run(phase(url, port, proc.pid, 60 * args.minutes, args.clients, args.idle, hostile=True))
        alive = httpx.get(url + "/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    log_text = Path(log.name).read_text()
    print(f"server log: {len(log_text.splitlines())} lines, {len(log_text) / 1e3:.0f} kB; healthy at the end: {alive}")
    print(f"{'phase':<10}{'requests':>10}{'errors':>10}{'TTFT p50':>11}{'TTFT p99':>11}{'E2E p50':>10}{'E2E p99':>10}"
          f"   RSS MB (every 5 s: first, max, last)")
    for name, ph in (("clean", clean), ("hostile", hostile)):
        rss = ph["rss_mb"] or [0]
        print(f"{name:<10}{ph['requests']:>10}{sum(ph['errors'].values()):>10}{ph['ttft_p50_ms']:>9.0f}ms"
              f"{ph['ttft_p99_ms']:>9.0f}ms{ph['e2e_p50_ms']:>8.0f}ms{ph['e2e_p99_ms']:>8.0f}ms   "
              f"{rss[0]}, {max(rss)}, {rss[-1]}")
    print(f"p99 E2E hostile / clean: {hostile['e2e_p99_ms'] / clean['e2e_p99_ms']:.2f}x; "
          f"p50: {hostile['e2e_p50_ms'] / clean['e2e_p50_ms']:.2f}x")
    print("normal-request errors under hostile load:", hostile["errors"] or "none")
    print("hostile outcomes:", dict(sorted(hostile["hostile"].items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
