"""Host-side helpers shared by the normalization kernels (rmsnorm, layernorm, crmsnorm).

Every norm kernel works on a 2-D view [rows, width] with a unit last-dim stride and
a tile of BLOCK_M rows x BLOCK_N columns per program. Widths up to MAX_BLOCK_N stay in
registers (one load per element); wider rows loop over column chunks.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest column block kept in registers: 16k fp32 per row is 32 values per thread at 16 warps.
MAX_BLOCK_N = 16384
# Elements per program. On a GPU a few thousand keep enough programs in flight; the
# interpreter runs programs one after another in Python, so it wants big tiles.
GPU_TILE = 4096
INTERPRETER_TILE = 65536


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: torch.Tensor) -> bool:
    """The dispatchers' rule: Triton on CUDA tensors of a kernel dtype, the torch reference otherwise
    (CPU, and fp64, which the exactness checks of the norm conversion use)."""
    return x.is_cuda and x.dtype in SUPPORTED_DTYPES


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def dot_block(n: int) -> int:
    """A block size covering n for a dimension of tl.dot, which needs every dimension >= 16."""
    return max(16, next_power_of_2(n))


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_input(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name}: needs a non-empty last dimension, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must be contiguous (stride 1), got strides {t.stride()}")


def as_rows(name: str, t: torch.Tensor, copy_ok: bool = False) -> torch.Tensor:
    """[..., width] -> [rows, width] without a copy; rows must share one stride. copy_ok (an input only read):
    leading dims that do not collapse into one row stride are copied instead (q/k heads sliced out of a fused
    QKV output: [tokens, heads, head_dim] with the token stride of the whole QKV row)."""
    check_input(name, t)
    width = t.shape[-1]
    if t.dim() == 1:
        return t.view(1, width)
    try:
        return t.view(-1, width)
    except RuntimeError as e:  # leading dims not collapsible into one row stride
        if copy_ok:
            return t.reshape(-1, width)
        raise ValueError(f"{name}: leading dimensions of shape {tuple(t.shape)} with strides {t.stride()} "
                         f"cannot be viewed as rows; pass a contiguous tensor") from e


def check_param(name: str, p: torch.Tensor | None, width: int, device: torch.device) -> None:
    """Per-feature vectors (weight, bias): 1-D, contiguous, same width and device; any supported dtype."""
    if p is None:
        return
    check_input(name, p)
    if p.dim() != 1 or p.shape[0] != width:
        raise ValueError(f"{name}: expected shape ({width},), got {tuple(p.shape)}")
    if p.device != device:
        raise ValueError(f"{name} is on {p.device} but the input is on {device}")


def check_same(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str = "x") -> None:
    check_input(name, t)
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} ({tuple(t.shape)}, {t.dtype}, {t.device}) must match {like_name} "
                         f"({tuple(like.shape)}, {like.dtype}, {like.device})")


def check_out(name: str, out: torch.Tensor | None, like: torch.Tensor) -> None:
    if out is not None:
        check_same(name, out, like)


def fused_add_ref(norm, x: torch.Tensor, residual: torch.Tensor, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fused add + norm: (norm(x + residual), x + residual); inplace writes them into x and residual."""
    new_residual = x + residual
    out = norm(new_residual)
    if inplace:
        residual.copy_(new_residual)
        x.copy_(out)
        return x, residual
    return out, new_residual


def fused_outputs(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None,
                  residual_out: torch.Tensor | None, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, residual_out) buffers of a fused add + norm: given, x and residual themselves (inplace), or new."""
    if inplace:
        if out is not None or residual_out is not None:
            raise ValueError("inplace=True writes into x and residual; do not pass out/residual_out")
        out, residual_out = x, residual
    check_out("out", out, x)
    check_out("residual_out", residual_out, x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    residual_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual_out is None else residual_out
    if residual_out.data_ptr() == out.data_ptr() and x.numel():
        raise ValueError("out and residual_out must be different tensors")
    return out, residual_out


def launch_config(rows: int, width: int, block_n: int | None = None) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, num_warps, single): the tile per program and whether one column block covers the row.

    `block_n` forces a column block (tests use it to exercise the looping path at small widths)."""
    if block_n is None:
        block_n = min(next_power_of_2(width), MAX_BLOCK_N)
    elif block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    tile = INTERPRETER_TILE if interpreting() else GPU_TILE
    block_m = max(1, min(tile // block_n, next_power_of_2(rows)))
    # ~16 elements per thread once the tile is big, never more than 16 warps.
    num_warps = max(1, min(16, (block_m * block_n) // 512))
    return block_m, block_n, num_warps, block_n >= width


# --- device helpers shared by the norm kernels -------------------------------------------
@triton.jit
def load_row_input(x_ptrs, r_ptrs, ro_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    """Load x (fp32); with a residual, also form x + residual, store it rounded to the
    residual's dtype and return that rounded sum, so out == norm(new residual) exactly
    as an eager `x + residual` followed by the norm would give."""
    # Upcast every load first: bf16 arithmetic is wrong in the interpreter and imprecise anyway.
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(ro_ptrs.dtype.element_ty)
        tl.store(ro_ptrs, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def store_scaled(y_ptrs, w_ptrs, xn, mask, col_mask, offset,
                 HAS_WEIGHT: tl.constexpr, SCALE_IN_FP32: tl.constexpr):
    """y = weight * xn. Llama rounds xn to the output dtype before the weight multiply;
    Gemma's (offset + w) variant multiplies in fp32 and rounds once (SCALE_IN_FP32)."""
    out_ty = y_ptrs.dtype.element_ty
    y = xn
    if HAS_WEIGHT:
        w = tl.load(w_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        if SCALE_IN_FP32:
            y = xn * (w + offset)
        else:
            y = xn.to(out_ty).to(tl.float32) * w
    tl.store(y_ptrs, y.to(out_ty), mask=mask)


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The references' compute dtype: fp32 for half inputs, fp64 stays fp64 (exactness checks)."""
    return torch.promote_types(x.dtype, torch.float32)
