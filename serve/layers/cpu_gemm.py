"""Which CPU linears run on packed weight panels instead of torch's F.linear (MKL), and with which kernel, decided
by measuring.

Two kernels read the same 32-feature weight panels (packserve.kernels.cpu_ops): the hand-written panel GEMM
(8 x 32 register tiles, the next panel prefetched: on AVX-512 it beat MKL for decode-sized inputs, LM head at 32
rows 2.2 vs 3.4 ms, but with AVX2's 16 vector registers its tiles spill and it is 5-60x slower) and oneDNN's brgemm
micro-kernel, generated at run time for the running CPU (on 2 cores of an AMD EPYC: 0.2-0.8x of MKL's time at
decode and prefill sizes with AVX-512, 0.2-0.9x capped at AVX2). Rather than trust one machine's numbers, each
weight shape is timed at start-up against F.linear for 1, 4, 16, 64, 256 and 1024 rows (in that order) with each
kernel (the candidates timed in alternation, so a neighbour's passing load slows them alike); per row count the
fastest kernel is kept if it beats F.linear by CALIBRATION_MARGIN. An input of r rows
takes the verdict of the smallest timed row count >= r, a larger one the verdict at 1024 (prefill steps), and a
shape no kernel ever wins keeps no packed copy at all. Results are cached per CPU model, ISA build, torch version
and thread count, so later starts skip the timing.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from packserve.kernels import cpu_lib, cpu_ops

log = logging.getLogger(__name__)

CALIBRATION_ROWS = (1, 4, 16, 64, 256, 1024)
# LM heads see the sampled rows (one per running request) and, rarely, prompt-logprob chunks: timing them at 256
# and 1024 rows took most of a first start's calibration (6 s of 6 for the serving model), so they are timed up
# to this many rows; larger inputs run F.linear.
HEAD_ROWS = 64
CALIBRATION_MARGIN = 0.95  # the panel must take at most 95% of torch's time: a tie goes to the library
_REPS = 5


KERNELS = ("panel", "brgemm")


@dataclass(frozen=True)
class CpuPackedLinear:
    """A panel-packed weight and, per input row count 0..1024, the kernel that serves it ("panel", "brgemm", or
    None: F.linear); larger inputs follow the verdict at 1024 rows."""
    panels: cpu_ops.PanelWeight
    kernels: tuple[str | None, ...]

    def kernel(self, rows: int) -> str | None:
        return self.kernels[min(rows, len(self.kernels) - 1)]


def _median_times(fns: dict) -> dict:
    """Median time of each callable, timed in alternation (F.linear, panel, brgemm, F.linear, ...): a neighbour's load
    that comes and goes during the calibration then slows every candidate alike instead of the one timed at that
    moment (timed one after the other on a busy host, whole verdicts flipped to F.linear)."""
    times: dict = {name: [] for name in fns}
    first = 0.0
    for fn in fns.values():
        t = time.perf_counter()
        fn()  # warm-up: first-touch of the output, the weights into the caches they fit in
        first = max(first, time.perf_counter() - t)
    for _ in range(max(_REPS, min(50, int(2e-3 / max(first, 1e-6))))):  # small shapes: more repeats
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _kernels() -> dict:
    kernels = {"panel": cpu_ops.linear_packed}
    if cpu_ops.has_brgemm_linear():
        kernels["brgemm"] = cpu_ops.linear_brgemm
    return kernels


def measure_wins(packed: cpu_ops.PanelWeight, weight: torch.Tensor, bias: torch.Tensor | None,
                 max_rows: int | None = None) -> list[str | None]:
    """Per CALIBRATION_ROWS entry: the fastest kernel if it beats F.linear by CALIBRATION_MARGIN, else None. A
    kernel 3x slower than F.linear (a build whose tiles spill) is not timed at larger row counts: it loses there
    too; nothing is timed past `max_rows` (None there)."""
    verdicts, kernels = [], _kernels()
    g = torch.Generator().manual_seed(0)
    for m in CALIBRATION_ROWS:
        if max_rows is not None and m > max_rows:
            verdicts.append(None)
            continue
        x = torch.randn(m, weight.shape[1], generator=g)
        fns = {name: (lambda fn=fn: fn(x, packed)) for name, fn in kernels.items()}
        times = _median_times({None: lambda: F.linear(x, weight, bias), **fns})
        ref = times.pop(None)
        best = min(times, key=times.get, default=None)
        verdicts.append(best if best is not None and times[best] <= CALIBRATION_MARGIN * ref else None)
        kernels = {name: kernels[name] for name in kernels if times[name] <= 3 * ref}
    return verdicts


def row_table(verdicts: list[str | None]) -> tuple[str | None, ...]:
    """rows 0..max -> the verdict of the smallest calibrated row count >= rows (None for 0 rows)."""
    table, k = [], 0
    for rows in range(CALIBRATION_ROWS[-1] + 1):
        while CALIBRATION_ROWS[k] < rows:
            k += 1
        table.append(verdicts[k] if rows > 0 else None)
    return tuple(table)


# Variables that cap the instruction set torch's own kernels use: the F.linear side of every comparison.
TORCH_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def _cache_key() -> str:
    src = cpu_lib.sources_digest()[:12]
    caps = "".join(f"|{k}={os.environ[k]}" for k in TORCH_ISA_CAPS if os.environ.get(k))
    return (f"{cpu_lib.cpu_model()}|{cpu_lib.loaded_isa()}|torch {torch.__version__}|{torch.get_num_threads()} threads|"
            f"{src}{caps}")


class Calibration:
    """Per weight shape, the kernel verdicts at CALIBRATION_ROWS for this machine; read from and written to the
    cache folder."""

    def __init__(self) -> None:
        self.path = cpu_lib.cache_dir() / "gemm-calibration.json"
        self.key = _cache_key()
        try:
            self.table: dict[str, list[str | None]] = json.loads(self.path.read_text()).get(self.key, {})
        except (OSError, ValueError):
            self.table = {}
        self.dirty = False

    def wins(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: cpu_ops.PanelWeight,
             max_rows: int | None = None) -> list[str | None]:
        shape = f"{weight.shape[0]}x{weight.shape[1]}{'+b' if bias is not None else ''}"
        if max_rows is not None:
            shape += f"<={max_rows}"
        if len(self.table.get(shape, ())) != len(CALIBRATION_ROWS):
            self.table[shape] = measure_wins(packed, weight, bias, max_rows)
            self.dirty = True
        return self.table[shape]

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            data[self.key] = self.table
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only cache: calibrate again next start
            log.info("GEMM calibration not cached (%s)", exc)


def pack(weight: torch.Tensor, bias: torch.Tensor | None, calibration: Calibration,
         max_rows: int | None = None) -> CpuPackedLinear | None:
    """The panel-packed copy of an fp32 CPU weight [out, in] where a panel kernel measured faster (timed up to
    `max_rows` rows: HEAD_ROWS for LM heads), else None (the C kernels must be loaded: prepack_cpu checks)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    panels = cpu_ops.pack_linear(weight, bias)
    verdicts = calibration.wins(weight, bias, panels, max_rows)
    return CpuPackedLinear(panels, row_table(verdicts)) if any(verdicts) else None
