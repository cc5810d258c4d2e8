"""Optional bf16 matmuls on CPU (PACKSERVE_CPU_MATMUL_PRECISION=bf16): an approximate mode for CPUs with bf16
matrix instructions (AMX-BF16 or AVX512-BF16, e.g. Intel Sapphire Rapids and later, AMD Zen 4 and later).

Weights and activations stay fp32; oneDNN rounds each matmul's inputs to bf16 and accumulates in fp32
(torch.backends.mkldnn.matmul.fp32_precision = "bf16"). On the 2-core AMX machine of BENCHMARKS.md the model's
linear layers ran 1.8x (8 rows) to 3.4x (64 rows) faster, but slower at 1 row, so steps of fewer than
BF16_MIN_ROWS tokens (small-batch decode) keep exact fp32. Logits move by bf16 rounding (~1e-2 relative), so
greedy outputs can differ from fp32 ones: an opt-in, never the default. Without those instructions bf16 would be
emulated and slower, so the mode is refused; it is refused too where oneDNN's bf16 mode does not round (seen on an
AMD EPYC with AVX512-BF16 and no AMX: the matmuls ran in fp32, only reordered), checked at start by one matmul.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from packserve.config import ConfigError
from packserve.kernels import cpu_lib
from packserve.layers.linear import use_panels

PRECISIONS = ("fp32", "bf16")
BF16_MIN_ROWS = 8  # measured: bf16 0.91x of fp32's time at 4 rows, 0.57x at 8, 0.29x at 64 (all five linears)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16() -> bool:
    return any(f in cpu_lib.cpu_flags() for f in BF16_CPU_FLAGS)


@functools.lru_cache(maxsize=1)
def bf16_mode_rounds() -> bool:
    """Whether oneDNN's bf16 mode rounds an fp32 linear here (64 x 256 x 256): bf16 inputs move it by ~1e-3
    relative, a reordered fp32 sum by ~1e-6."""
    if not cpu_has_bf16():
        return False
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(256, 256, generator=g)
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        rounded = F.linear(x, w)
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        exact = F.linear(x, w)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    return bool((rounded - exact).abs().max() > 1e-4 * exact.abs().max())


class CpuMatmulPrecision:
    """Sets oneDNN's fp32 matmul precision for each CPU step: bf16 for steps of BF16_MIN_ROWS tokens or more in
    bf16 mode, exact fp32 ("ieee") otherwise (also in fp32 mode, so an engine never inherits another's setting)."""

    def __init__(self, mode: str):
        if mode not in PRECISIONS:
            raise ConfigError(f"cpu matmul precision must be one of {PRECISIONS}, got {mode!r}")
        if mode == "bf16" and not cpu_has_bf16():
            raise ConfigError("PACKSERVE_CPU_MATMUL_PRECISION=bf16 needs a CPU with AMX-BF16 or AVX512-BF16 "
                              f"({cpu_lib.cpu_model()} has neither: bf16 would be emulated, slower than fp32)")
        if mode == "bf16" and not bf16_mode_rounds():
            raise ConfigError("PACKSERVE_CPU_MATMUL_PRECISION=bf16 would change nothing here: oneDNN's bf16 mode "
                              f"runs {cpu_lib.cpu_model()}'s fp32 matmuls in fp32 (seen on CPUs with AVX512-BF16 "
                              "but no AMX)")
        self.bf16 = mode == "bf16"

    def apply(self, rows: int) -> None:
        want = "bf16" if self.bf16 and rows >= BF16_MIN_ROWS else "ieee"
        if torch.backends.mkldnn.matmul.fp32_precision != want:
            torch.backends.mkldnn.matmul.fp32_precision = want
        use_panels(want == "ieee")
