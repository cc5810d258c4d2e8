"""CPU fast paths vs plain torch, per ISA: decode step time at batch 1, 4 and 32.

The issue this answers: a kernel tuned on one CPU must never make another one slower than packserve's own torch
path. Each configuration runs in its own process (the ISA switches are read when libraries load), alternating
A/B over `--repeats` rounds in one invocation:

- `<isa> kernels`: packserve's C kernels built for that ISA (PACKSERVE_CPU_ISA), the default path;
- `<isa> torch`: PACKSERVE_CPU_KERNELS=0.

`avx2` rows on an AVX-512 machine also cap torch's own libraries at AVX2 (ATEN_CPU_CAPABILITY=avx2,
MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2), so the whole process runs as on an AVX2-only CPU (the
16-register limit included); clocks and caches stay this machine's.

Workload: the serving model (Llama, hidden 384, 6 layers, 6 heads / 2 KV heads, vocab 32000, fp32), B prompts
of 256 random tokens; decode ms/step = (time of 65 new tokens - time of 1) / 64 (`--new-tokens`), medians.
The engine's thread tuner (PACKSERVE_THREAD_TUNING) first tries half the threads after 256 decode steps: use
`--new-tokens 1025` with `--busy-core` to see it act, and PACKSERVE_THREAD_TUNING=0 for the fixed count. Prints a table and the
ratio kernels / torch for every ISA and batch (below 1.00 = the kernels are faster).

Contention (a shared host): `--busy-core C` runs a busy loop pinned to core C during every run, and
`--cpu-quota Q` runs each engine in a cgroup (v1 `cpu` controller, root needed) with a quota of Q CPUs, as a
Kubernetes CPU limit does; `--threads 0` keeps packserve's own thread choice (the CPUs it may use, capped by the
quota).

  python benchmarks/cpu_paths.py [--repeats 3] [--batches 1 4 32] [--isas avx512 avx2] [--threads N]
                                 [--busy-core C] [--cpu-quota Q]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_llama_config  # noqa: E402

AVX2_LIBS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

CHILD = r"""
import json, statistics, sys, time, torch
from packserve import LLM, SamplingParams
from packserve.kernels import cpu_lib
path, batches, threads, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
cpu_lib.wait()
llm = LLM(path, prefix_caching=False)
out_threads = torch.get_num_threads()
g = torch.Generator().manual_seed(0)
out = {"isa": cpu_lib.loaded_isa(), "aten": torch.backends.cpu.get_cpu_capability(), "step_ms": {},
       "threads": out_threads}
llm.generate([[5, 6, 7]] * 2, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
for b in batches:
    prompts = [torch.randint(10, 32000, (256,), generator=g).tolist() for _ in range(b)]
    def run(n):
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - t
    run(2)
    t1 = statistics.median(run(1) for _ in range(3))
    tn = run(new)
    out["step_ms"][str(b)] = (tn - t1) / (new - 1) * 1e3
print("RESULT " + json.dumps(out))
"""


def configs(isas: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for isa in isas:
        base = {"PACKSERVE_CPU_ISA": isa, **(AVX2_LIBS if isa == "avx2" else {})}
        out[f"{isa} kernels"] = base
        out[f"{isa} torch"] = {**base, "PACKSERVE_CPU_KERNELS": "0"}
    return out


def main() -> int:
    from packserve.kernels import cpu_lib

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 32])
    ap.add_argument("--isas", nargs="+", default=cpu_lib.supported_isas(), choices=cpu_lib.ISAS)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: packserve's default)")
    ap.add_argument("--busy-core", type=int, default=None, help="a busy loop pinned to this core meanwhile")
    ap.add_argument("--cpu-quota", type=float, default=None, help="run each engine under this CPU quota")
    ap.add_argument("--new-tokens", type=int, default=65, help="tokens per timed generation (decode steps + 1)")
    args = ap.parse_args()
    for isa in args.isas:  # build outside the timed processes
        cpu_lib.build(isa)

    import torch
    from transformers import AutoModelForCausalLM

    from packserve.checkpoints import build_tokenizer, save_checkpoint

    cfgs = configs(args.isas)
    runs: dict[str, list[dict]] = {name: [] for name in cfgs}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_checkpoint(AutoModelForCausalLM.from_config(cpu_llama_config()), build_tokenizer(), tmp)
        child = [sys.executable, "-c", CHILD, tmp, json.dumps(args.batches), str(args.threads), str(args.new_tokens)]
        if args.cpu_quota:
            group = Path("/sys/fs/cgroup/cpu/packserve-bench")
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text(str(int(args.cpu_quota * 100000)))
            child = ["sh", "-c", f'echo $$ > {group}/tasks; exec "$@"', "sh", *child]
        busy = None
        if args.busy_core is not None:
            busy = subprocess.Popen(["taskset", "-c", str(args.busy_core), sys.executable, "-c", "while True: pass"])
        try:
            for _ in range(args.repeats):
                for name, env in cfgs.items():
                    proc = subprocess.run(child, env={**os.environ, **env}, capture_output=True, text=True)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        print(proc.stderr[-2000:], file=sys.stderr)
                        return 1
                    runs[name].append(json.loads(line[7:]))
        finally:
            if busy is not None:
                busy.kill()
    cpu = cpu_lib.cpu_model()
    threads = sorted({r["threads"] for rs in runs.values() for r in rs})
    print(f"CPU: {cpu}; runs: {cpu_lib.supported_isas()}; torch {torch.__version__}, threads {threads}; "
          f"busy core: {args.busy_core}; CPU quota: {args.cpu_quota}; medians of {args.repeats}")
    med = {name: {b: statistics.median(r["step_ms"][str(b)] for r in rs) for b in args.batches}
           for name, rs in runs.items()}
    print(f"{'decode ms/step':<16}{'loaded':<10}" + "".join(f"{'B=' + str(b):>10}" for b in args.batches))
    for name, rs in runs.items():
        print(f"{name:<16}{(rs[0]['isa'] or '-') + '/' + rs[0]['aten']:<10}"
              + "".join(f"{med[name][b]:>10.1f}" for b in args.batches))
    for isa in args.isas:
        k, t = med[f"{isa} kernels"], med[f"{isa} torch"]
        print(f"{isa}: kernels / torch " + "  ".join(f"B={b} {k[b] / t[b]:.2f}x" for b in args.batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
