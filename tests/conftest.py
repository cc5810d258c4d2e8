"""Shared fixtures: real checkpoint folders built offline with seeded random weights."""

from __future__ import annotations

import os

import pytest

# Tests run on CPU in fp32 with a small, fixed thread count (CI has 2 cores).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Equivalence tests compare against transformers in fp32 on CPU, also on GPU hosts; GPU tests ask for cuda.
os.environ.setdefault("PACKSERVE_DEVICE", "cpu")


def _set_triton_interpreter() -> None:
    """Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is imported.
    On GPU hosts the real kernels run, so the variable is left alone there."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_set_triton_interpreter()


def _build_cpu_kernels() -> None:
    """The C kernels build in the background on first use; the suite waits for them once, up front, so every
    engine test runs the default (kernel) paths from its first step."""
    from packserve.kernels import cpu_lib

    cpu_lib.wait()


_build_cpu_kernels()

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(arch, **config_overrides) -> path of a saved HF checkpoint (cached per session)."""
    from packserve.checkpoints import build_tiny_checkpoint

    cache: dict = {}

    def make(arch: str, seed: int = 0, **overrides) -> str:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{arch}")
            cache[key] = str(build_tiny_checkpoint(arch, path, seed=seed, **overrides))
        return cache[key]

    return make
