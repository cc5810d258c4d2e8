"""Frozen, validated configuration dataclasses. Derived values are properties."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("auto", "sdpa", "flex", "varlen", "xformers")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
PACKING_ALGORITHMS = ("ffd", "bfd")
NORM_MODES = ("native", "rmsnorm", "crmsnorm")


class ConfigError(ValueError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    max_model_len: int | None = None  # None: the checkpoint's context length
    norm_mode: str = "native"
    seed: int = 0
    tensor_parallel_size: int = 1  # processes the weights and KV cache are split over (packserve.engine.tensor_parallel)
    enforce_eager: bool = False  # True: no CUDA graphs of the decode step (packserve.engine.cuda_graphs)

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and self.model != "", "model must be a checkpoint folder path")
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
               "tensor_parallel_size must be >= 1")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _check(self.norm_mode in NORM_MODES, f"norm_mode must be one of {NORM_MODES}, got {self.norm_mode!r}")
        _check(self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # explicit count wins over the memory budget
    memory_gib: float | None = None  # None: a device-dependent default (see runner)
    # Reuse the KV blocks of prompt prefixes seen before (packserve.engine.kv_cache); off for models with
    # linear-attention layers, whose per-request state is not made of blocks.
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size must be a power of 2")
        _check(self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1")
        _check(self.memory_gib is None or self.memory_gib > 0, "memory_gib must be > 0")


ADMISSION_ORDERS = ("fcfs", "shortest")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # the offline defaults (LLM, engine_config); the server's CPU budget: packserve.envs
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    packing: str = "ffd"
    pack_length: int | None = None  # row capacity; None: the longest prompt in the step
    max_waiting: int | None = None  # None: unbounded (offline); the server always bounds it
    # Which waiting requests are admitted first: "fcfs" (arrival order) or "shortest" (fewest tokens left to
    # prefill first, so a burst's short prompts get their first token without waiting behind long ones; a request
    # waiting aging_steps steps or more, or preempted, goes first in arrival order, so none starves).
    admission: str = "fcfs"
    aging_steps: int = 32
    # Siblings (requests of one prompt with n > 1 or best_of) take the prompt's KV blocks from the first one to
    # compute it instead of prefilling it again (not for linear-attention models, whose state is per request).
    share_prompt: bool = True
    # With prefix caching, a cached prefix is used only when it covers at least this fraction of the request's
    # tokens (None: the engine's default for its attention path, packserve.engine.scheduler.min_cached_fraction).
    min_cached_fraction: float | None = None

    def __post_init__(self) -> None:
        _check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _check(self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens must be >= max_num_seqs "
               "(every running request decodes one token per step)")
        _check(self.max_model_len >= 2, "max_model_len must be >= 2")
        _check(self.packing in PACKING_ALGORITHMS, f"packing must be one of {PACKING_ALGORITHMS}")
        _check(self.pack_length is None or self.pack_length >= 1, "pack_length must be >= 1")
        _check(self.max_waiting is None or self.max_waiting >= 1, "max_waiting must be >= 1")
        _check(self.admission in ADMISSION_ORDERS, f"admission must be one of {ADMISSION_ORDERS}")
        _check(self.aging_steps >= 1, "aging_steps must be >= 1")
        _check(self.min_cached_fraction is None or 0 <= self.min_cached_fraction <= 1,
               "min_cached_fraction must be in [0, 1]")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
