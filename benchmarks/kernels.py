"""Norm kernels: achieved bandwidth against a device-to-device copy measured in the same run.

For each kernel and width it prints time, GB/s (each input read once, each output written
once) and % of the copy bandwidth, for: our Triton kernel (CUDA only), eager torch (the
reference beside the kernel), torch.compile of that reference, and Liger-Kernel when it is
installed. CUDA: bf16, 4096+ rows, widths 2048-8192, triton.testing.do_bench medians.
CPU (`--quick`): the torch paths at small sizes, only to show the script runs.

  python benchmarks/kernels.py                # CUDA: the full table
  python benchmarks/kernels.py --quick        # CPU smoke run
  python benchmarks/kernels.py --e2e          # + GPT-2-medium-shaped prefill: native vs rmsnorm vs crmsnorm
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from packserve.kernels import crmsnorm, layernorm, rmsnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench as common_bench, timeit  # noqa: E402

EPS = 1e-6


GRAPH = False  # --graph: time CUDA-graph replays, which hides host launch overhead for every implementation


def bench(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    return common_bench(fn, device, reps, graph=GRAPH)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of dst.copy_(src): nbytes read + nbytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src), device)


@dataclass
class Case:
    op: str
    rows: int
    width: int
    dtype: torch.dtype
    device: torch.device

    def tensors(self):
        g = torch.Generator(device=self.device).manual_seed(0)
        mk = lambda *shape: torch.randn(*shape, generator=g, device=self.device).to(self.dtype)  # noqa: E731
        return mk(self.rows, self.width), mk(self.rows, self.width), mk(self.width), mk(self.width)

    def nbytes(self) -> int:
        es = torch.finfo(self.dtype).bits // 8
        act = self.rows * self.width * es
        fused = self.op.startswith("fused_add")
        params = {"layer_norm": 2, "fused_add_layer_norm": 2, "crms_norm": 0}.get(self.op, 1) * self.width * es
        return (4 if fused else 2) * act + params  # fused: read x, residual; write out, new residual


def implementations(case: Case, compile_ok: bool) -> dict[str, Callable[[], object]]:
    """name -> zero-argument callable, for every implementation available for this op and device."""
    x, r, w, b = case.tensors()
    op = case.op
    refs = {
        "rms_norm": lambda x, r: rmsnorm.rms_norm_ref(x, w, EPS),
        "fused_add_rms_norm": lambda x, r: rmsnorm.fused_add_rms_norm_ref(x, r, w, EPS),
        "layer_norm": lambda x, r: layernorm.layer_norm_ref(x, w, b, EPS),
        "fused_add_layer_norm": lambda x, r: layernorm.fused_add_layer_norm_ref(x, r, w, b, EPS),
        "crms_norm": lambda x, r: crmsnorm.crms_norm_ref(x, EPS),
    }
    impls: dict[str, Callable[[], object]] = {}
    if case.device.type == "cuda":
        out, res = torch.empty_like(x), torch.empty_like(x)
        impls["triton"] = {
            "rms_norm": lambda: rmsnorm.rms_norm_triton(x, w, EPS, out=out),
            "fused_add_rms_norm": lambda: rmsnorm.fused_add_rms_norm_triton(x, r, w, EPS, out=out, residual_out=res),
            "layer_norm": lambda: layernorm.layer_norm_triton(x, w, b, EPS, out=out),
            "fused_add_layer_norm": lambda: layernorm.fused_add_layer_norm_triton(x, r, w, b, EPS, out=out,
                                                                                  residual_out=res),
            "crms_norm": lambda: crmsnorm.crms_norm_triton(x, EPS, out=out),
        }[op]
    ref = refs[op]
    impls["eager"] = lambda: ref(x, r)
    if compile_ok:
        compiled = torch.compile(ref, dynamic=False)
        impls["compile"] = lambda: compiled(x, r)
    liger = _liger(op, case.width, w, b)
    if liger is not None and case.device.type == "cuda":
        impls["liger"] = lambda: liger(x, r)
    return impls


def _liger(op: str, width: int, w: torch.Tensor, b: torch.Tensor):
    """Liger-Kernel's module for this op (weights copied in), or None when it is not installed."""
    try:
        import liger_kernel.transformers as lt
    except ImportError:
        return None
    try:
        if op == "rms_norm":
            m = lt.LigerRMSNorm(width, eps=EPS)
        elif op == "fused_add_rms_norm" and hasattr(lt, "LigerFusedAddRMSNorm"):
            m = lt.LigerFusedAddRMSNorm(width, eps=EPS)
        elif op == "layer_norm":
            m = lt.LigerLayerNorm(width, eps=EPS)
        else:
            return None
        m = m.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(b)
    except Exception as e:  # an API change in Liger must not stop the table
        print(f"  (liger {op}: {type(e).__name__}: {e})", file=sys.stderr)
        return None
    if op == "fused_add_rms_norm":
        return lambda x, r: m(x, r)
    return lambda x, r: m(x)


def run_table(device: torch.device, dtype: torch.dtype, rows: int, widths: list[int], ops: list[str],
              compile_ok: bool) -> list[dict]:
    copy_bw = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"dtype {str(dtype).removeprefix('torch.')}; rows {rows}")
    print(f"measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s\n")
    print(f"{'op':<22}{'width':>6}  {'impl':<8}{'time us':>10}{'GB/s':>9}{'% copy':>8}")
    results = []
    for op in ops:
        for width in widths:
            case = Case(op, rows, width, dtype, device)
            for name, fn in implementations(case, compile_ok).items():
                try:
                    with torch.inference_mode():
                        t = bench(fn, device)
                except Exception as e:  # e.g. torch.compile without a working toolchain
                    print(f"{op:<22}{width:>6}  {name:<8}  failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                bw = case.nbytes() / t
                results.append(dict(op=op, width=width, rows=rows, impl=name, seconds=t, gbps=bw / 1e9,
                                    pct_copy=100 * bw / copy_bw))
                print(f"{op:<22}{width:>6}  {name:<8}{t * 1e6:>10.1f}{bw / 1e9:>9.0f}{100 * bw / copy_bw:>7.0f}%")
        print()
    return results


def run_e2e(device: torch.device, quick: bool) -> None:
    """Prefill of a GPT-2-medium-shaped model (random weights): native LayerNorm vs the converted forms."""
    import tempfile

    from transformers import GPT2Config

    from packserve import LLM
    from packserve.checkpoints import build_tokenizer, random_hf_model, save_checkpoint

    if quick:
        cfg = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=1024, n_positions=512, bos_token_id=1,
                         eos_token_id=0)
        n, length = 8, 64
    else:  # GPT-2 medium
        cfg = GPT2Config(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024)
        n, length = 64, 512
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, cfg.vocab_size, (length,), generator=g).tolist() for _ in range(n)]
    with tempfile.TemporaryDirectory() as path:
        save_checkpoint(random_hf_model(cfg, seed=0), build_tokenizer(512), path)
        print(f"prefill, GPT-2 n_embd={cfg.n_embd} n_layer={cfg.n_layer}: {n} prompts x {length} tokens")
        base = None
        for mode in ("native", "rmsnorm", "crmsnorm"):
            llm = LLM(path, norm_mode=mode, device=device.type, num_kv_blocks=4096 if not quick else 256)
            with torch.inference_mode():
                # Whole prefill, host work included: that is what serving pays.
                t = timeit(lambda: llm.engine.prefill_logits(prompts), 5, device)
            base = base or t
            print(f"  {mode:<9}{t * 1e3:>9.1f} ms   {base / t:.3f}x native")
            del llm
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--widths", type=int, nargs="+", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--ops", nargs="+", default=["rms_norm", "fused_add_rms_norm", "layer_norm",
                                                "fused_add_layer_norm", "crms_norm"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--graph", action="store_true", help="CUDA: time CUDA-graph replays (no host overhead)")
    p.add_argument("--e2e", action="store_true", help="also time GPT-2-medium prefill: native vs rmsnorm vs crmsnorm")
    args = p.parse_args(argv)
    global GRAPH
    GRAPH = args.graph

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.quick or device.type == "cpu"
    rows = args.rows or (64 if small else 4096)
    widths = args.widths or ([256, 769] if small else [2048, 4096, 8192])
    # No fast half precision on the CPUs we run: fp32 there.
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    compile_ok = not args.no_compile
    run_table(device, dtype, rows, widths, args.ops, compile_ok)
    if args.e2e:
        run_e2e(device, small)


if __name__ == "__main__":
    main()
