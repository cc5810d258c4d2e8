"""The Triton kernels the models call per layer, as torch operators (namespace `packserve_triton`).

Each kernel file registers its ops here (`register`): a schema, the host wrapper as the implementation for every
device (CUDA; CPU tensors in the Triton interpreter, which the tests use) and a fake implementation giving output
shapes without a launch. So torch.compile traces one operator per call instead of breaking its graph on a Triton
launch, and FakeTensor shape propagation needs no device. `torch.library.Library.define/impl` keeps a call a
plain dispatcher call, without `torch.library.custom_op`'s Python wrapper (~10 us a call), which a launch-bound
eager step would feel. The dispatchers (`rms_norm`, `paged_attention`, ...) call the operators for CUDA tensors.
"""

from __future__ import annotations

from typing import Callable

import torch

NS = "packserve_triton"
_lib = torch.library.Library(NS, "DEF")


_impls: dict[str, Callable] = {}


def register(schema: str, impl: Callable, fake: Callable) -> None:
    """Define `NS::name(args) -> out` from its schema, with `impl` for every device and `fake` for FakeTensors.
    A module reloaded (the tests reload kernel files to switch the Triton interpreter on) registers again: the
    operator then calls the new implementation (an operator is defined once per process)."""
    name = schema.split("(", 1)[0]
    first = name not in _impls
    _impls[name] = impl
    if first:
        _lib.define(schema)
        _lib.impl(name, lambda *args: _impls[name](*args), "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NS}::{name}", fake, lib=_lib)


def fake_like(x: torch.Tensor, *_) -> torch.Tensor:
    """The fake of an op returning a new contiguous tensor shaped like its first input."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fake_like_pair(x: torch.Tensor, *_) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake of a fused residual-add op: (norm output, new residual), both shaped like x."""
    return fake_like(x), fake_like(x)


def ops():
    """torch.ops.packserve_triton, once every kernel file has registered its operators."""
    import packserve.kernels.crmsnorm  # noqa: F401  (each import registers its file's operators)
    import packserve.kernels.layernorm  # noqa: F401
    import packserve.kernels.paged_attention_triton  # noqa: F401
    import packserve.kernels.rmsnorm  # noqa: F401

    return getattr(torch.ops, NS)
