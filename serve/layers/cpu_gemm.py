"""Which decode-sized CPU linears run packserve's panel GEMM instead of torch's (MKL), decided by measuring.

The panel GEMM (packserve.kernels.cpu_ops.linear_packed) keeps 8 x 32 register tiles and prefetches the next
weight panel: on AVX-512 it beats MKL's sgemm for decode-sized inputs (LM head at 32 rows: 2.2 vs 3.4 ms), but
with AVX2's 16 vector registers the same tiles spill and it is 5-40x slower than MKL. Rather than trust one
machine's numbers, each weight shape is timed at start-up against F.linear for 1, 4, 16, 64, 256 and 1024 rows (in
that order); an input of r rows takes the verdict of the smallest timed row count >= r, a larger one the verdict at
1024 (prefill steps: MKL's sgemm is not everywhere at its best, e.g. 100-150 GFLOP/s on 2 cores of an AVX-512 AMD
EPYC where the panels reach ~1.3x that), the panel must win by CALIBRATION_MARGIN, and a shape the panel never
wins keeps no packed copy at all. Results are cached
per CPU model, ISA build, torch version and thread count, so later starts skip the timing.
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
CALIBRATION_MARGIN = 0.95  # the panel must take at most 95% of torch's time: a tie goes to the library
_REPS = 5


@dataclass(frozen=True)
class CpuPackedLinear:
    """A panel-packed weight and, per input row count 0..1024, whether the panel GEMM serves it (the rest:
    F.linear); larger inputs follow the verdict at 1024 rows."""
    panels: cpu_ops.PanelWeight
    use_panel: tuple[bool, ...]

    def serves(self, rows: int) -> bool:
        return self.use_panel[min(rows, len(self.use_panel) - 1)]


def _median_time(fn) -> float:
    t = time.perf_counter()
    fn()  # warm-up: first-touch of the output, the weights into the caches they fit in
    first = time.perf_counter() - t
    times = []
    for _ in range(max(_REPS, min(50, int(2e-3 / max(first, 1e-6))))):  # small shapes: more repeats
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_wins(packed: cpu_ops.PanelWeight, weight: torch.Tensor, bias: torch.Tensor | None) -> list[bool]:
    """Per CALIBRATION_ROWS entry: does the panel GEMM beat F.linear by CALIBRATION_MARGIN? Once it is 3x
    slower (a build whose tiles spill), larger row counts are not timed: they lose too."""
    wins = []
    g = torch.Generator().manual_seed(0)
    for m in CALIBRATION_ROWS:
        x = torch.randn(m, weight.shape[1], generator=g)
        ours = _median_time(lambda: cpu_ops.linear_packed(x, packed))
        ref = _median_time(lambda: F.linear(x, weight, bias))
        wins.append(ours <= CALIBRATION_MARGIN * ref)
        if ours > 3 * ref:
            break
    return wins + [False] * (len(CALIBRATION_ROWS) - len(wins))


def row_table(wins: list[bool]) -> tuple[bool, ...]:
    """rows 0..max -> the verdict of the smallest calibrated row count >= rows."""
    table, k = [], 0
    for rows in range(CALIBRATION_ROWS[-1] + 1):
        while CALIBRATION_ROWS[k] < rows:
            k += 1
        table.append(wins[k] and rows > 0)
    return tuple(table)


def _cache_key() -> str:
    src = cpu_lib.sources_digest()[:12]
    return (f"{cpu_lib.cpu_model()}|{cpu_lib.loaded_isa()}|torch {torch.__version__}|{torch.get_num_threads()} threads|"
            f"{src}")


class Calibration:
    """Per weight shape, the panel GEMM's wins at CALIBRATION_ROWS, for this machine; read from and written to the cache folder."""

    def __init__(self) -> None:
        self.path = cpu_lib.cache_dir() / "gemm-calibration.json"
        self.key = _cache_key()
        try:
            self.table: dict[str, list[bool]] = json.loads(self.path.read_text()).get(self.key, {})
        except (OSError, ValueError):
            self.table = {}
        self.dirty = False

    def wins(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: cpu_ops.PanelWeight) -> list[bool]:
        shape = f"{weight.shape[0]}x{weight.shape[1]}{'+b' if bias is not None else ''}"
        if len(self.table.get(shape, ())) != len(CALIBRATION_ROWS):
            self.table[shape] = measure_wins(packed, weight, bias)
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


def pack(weight: torch.Tensor, bias: torch.Tensor | None, calibration: Calibration) -> CpuPackedLinear | None:
    """The panel-packed copy of an fp32 CPU weight [out, in] where the panel GEMM measured faster, else None
    (the C kernels must be loaded: prepack_cpu checks)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    panels = cpu_ops.pack_linear(weight, bias)
    wins = calibration.wins(weight, bias, panels)
    return CpuPackedLinear(panels, row_table(wins)) if any(wins) else None
