"""Typed registry of `PACKSERVE_*` environment variables.

Every `packserve serve` option has one: the CLI builds its argparse options from
this table, so a flag and its variable can never drift apart. Precedence: the
command-line flag, then the variable, then the default. Read values with
`get(name)`; an unparsable value raises `EnvError` naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

PREFIX = "PACKSERVE_"


class EnvError(ValueError):
    pass


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {raw!r}")


def _csv(raw: str) -> list[str]:
    return [s.strip() for s in raw.split(",") if s.strip()]


@dataclass(frozen=True)
class EnvVar:
    name: str  # without the prefix, e.g. "PORT"
    type: Callable[[str], Any]
    default: Any
    help: str
    flag: str | None = None  # the CLI flag it backs (None: environment only)
    choices: tuple | None = None
    multiple: bool = False  # a repeatable flag; the variable holds a comma-separated list
    secret: bool = False  # never logged

    @property
    def is_switch(self) -> bool:
        """An on/off option: its flag alone means on."""
        return self.type is _bool

    @property
    def env(self) -> str:
        return PREFIX + self.name

    def parse(self, raw: str) -> Any:
        try:
            value = _csv(raw) if self.multiple else self.type(raw)
        except ValueError as exc:
            raise EnvError(f"{self.env}: {exc}") from None
        if self.choices is not None and value not in self.choices:
            raise EnvError(f"{self.env} must be one of {self.choices}, got {value!r}")
        return value

    def get(self) -> Any:
        raw = os.environ.get(self.env)
        if raw is None or raw == "":
            return self.default
        return self.parse(raw)


_VARS = [
    EnvVar("MODEL", str, None, "checkpoint folder (default: the built-in demo model)", "--model"),
    EnvVar("SERVED_MODEL_NAME", str, None, "model name clients send (default: the folder name)",
           "--served-model-name"),
    EnvVar("HOST", str, "127.0.0.1", "bind address", "--host"),
    EnvVar("PORT", int, 8000, "TCP port", "--port"),
    EnvVar("BACKEND", str, "auto", "packed attention backend", "--backend",
           choices=("auto", "sdpa", "flex", "varlen", "xformers")),
    EnvVar("DTYPE", str, "auto", "weights/activations dtype (CPU: float32)", "--dtype",
           choices=("auto", "float32", "float16", "bfloat16")),
    EnvVar("DEVICE", str, "auto", "cpu, cuda or auto", "--device", choices=("auto", "cpu", "cuda")),
    EnvVar("MAX_MODEL_LEN", int, None, "context length limit (default: the checkpoint's)", "--max-model-len"),
    EnvVar("MAX_NUM_SEQS", int, 128, "most requests running at once", "--max-num-seqs"),
    EnvVar("MAX_NUM_BATCHED_TOKENS", int, None,
           "token budget of one engine step (default: 8192 on GPU; on CPU 2048, or --max-num-seqs if larger, as "
           "vLLM-CPU's server: a step of 8k prompt tokens takes ~1 s on 2 cores and every stream waits for it, so "
           "a burst's first tokens come sooner in smaller steps; much smaller ones make the started streams wait "
           "through more prefill steps)", "--max-num-batched-tokens"),
    EnvVar("ADMISSION_ORDER", str, "shortest",
           "which waiting requests start first: shortest (fewest prompt tokens first; preempted ones and those "
           "waiting 32 steps or more go first, in arrival order) or fcfs (arrival order)", "--admission-order",
           choices=("shortest", "fcfs")),
    EnvVar("TENSOR_PARALLEL_SIZE", int, 1,
           "processes the weights and KV cache are split over (one per GPU; on CPU they share the cores): "
           "Llama, Mistral, Qwen2/3, GPT-2 and the linear-attention hybrid", "--tensor-parallel-size"),
    EnvVar("ENFORCE_EAGER", _bool, False,
           "on CUDA, run decode steps eagerly instead of replaying the CUDA graphs captured at start-up per "
           "batch-size bucket", "--enforce-eager"),
    EnvVar("TOOL_CALL_PARSER", str, "auto",
           "how the model writes tool calls: hermes (<tool_call> JSON: Hermes, Qwen), llama3_json (Llama 3.x), "
           "mistral ([TOOL_CALLS]), or auto (from the chat template; hermes when it shows none)",
           "--tool-call-parser", choices=("auto", "hermes", "llama3_json", "mistral")),
    EnvVar("BATCH_WINDOW_MS", float, 10.0,
           "on an idle server, how long the first request may wait for more to arrive (until a 2 ms pause) so a "
           "burst is packed into one prefill; 0 starts at once", "--batch-window-ms"),
    EnvVar("MAX_WAITING", int, 256, "bounded waiting queue; beyond it requests get 429", "--max-waiting"),
    EnvVar("NUM_KV_BLOCKS", int, None, "KV cache blocks (default: from the memory budget)", "--num-kv-blocks"),
    EnvVar("KV_CACHE_MEMORY_GIB", float, None, "KV cache memory budget in GiB", "--kv-cache-memory-gib"),
    EnvVar("BLOCK_SIZE", int, 16, "tokens per KV block", "--block-size"),
    EnvVar("PACKING", str, "ffd", "prefill bin-packing algorithm", "--packing", choices=("ffd", "bfd")),
    EnvVar("PREFIX_CACHING", _bool, True, "reuse the KV blocks of prompt prefixes seen before (on/off)",
           "--prefix-caching"),
    EnvVar("NORM_MODE", str, "native", "GPT-2 norm conversion", "--norm-mode",
           choices=("native", "rmsnorm", "crmsnorm")),
    EnvVar("SEED", int, 0, "engine seed", "--seed"),
    EnvVar("NUM_THREADS", int, None,
           "torch CPU threads (default: the CPUs this process may use, capped by its cgroup CPU quota)",
           "--num-threads"),
    EnvVar("API_KEY", str, [], "bearer key(s) required on /v1/* (repeat the flag; comma-separated in the variable)",
           "--api-key", multiple=True, secret=True),
    EnvVar("ALLOWED_ORIGINS", str, [], "CORS origins (repeat; comma-separated in the variable)",
           "--allowed-origin", multiple=True),
    EnvVar("MAX_BODY_BYTES", int, 8 * 2**20, "largest request body accepted (413 beyond)", "--max-body-bytes"),
    EnvVar("READ_TIMEOUT", float, 15.0,
           "seconds a connection may take to send a request's headers (from connecting, or from the previous "
           "response), and to send each part of a body; slower connections are closed", "--read-timeout"),
    EnvVar("MAX_IDLE_CONNECTIONS", int, 512,
           "connections waiting for a request's headers kept open at most (the longest-waiting is closed "
           "beyond it; capped at half the open-file limit)", "--max-idle-connections"),
    EnvVar("MAX_N", int, 16, "largest `n` (and prompts x n per request)", "--max-n"),
    EnvVar("SHUTDOWN_TIMEOUT", float, 30.0, "on SIGTERM, seconds to let in-flight requests finish before aborting",
           "--shutdown-timeout"),
    EnvVar("LOG_LEVEL", str, "info", "log level", "--log-level",
           choices=("critical", "error", "warning", "info", "debug")),
    EnvVar("MALLOC_TUNING", _bool, True,
           "on CPU, keep freed activation memory in glibc's heap instead of page-faulting it in every step "
           "(packserve.host); 0 leaves malloc alone"),
    EnvVar("CPU_KERNELS", _bool, True,
           "CPU fp32 fast paths: packserve's C++ torch operators (built with torch.utils.cpp_extension once per ISA "
           "and cached in the cache folder; `packserve build-kernels` builds them ahead, else the first start builds "
           "them in the background while the torch paths serve); 0 keeps plain torch"),
    EnvVar("CPU_MATMUL_PRECISION", str, "fp32",
           "CPU matmuls: fp32 (exact), or bf16 (approximate, ~3x faster prefill; needs AMX-BF16 or AVX512-BF16; "
           "steps under 8 tokens stay fp32; packserve.engine.precision)", choices=("fp32", "bf16")),
    EnvVar("CPU_ISA", str, "auto",
           "which build of the CPU operators to run: auto (the best this CPU runs), avx512 or avx2 (e.g. the AVX2 "
           "build on an AVX-512 CPU)", choices=("auto", "avx512", "avx2")),
    EnvVar("THREAD_TUNING", _bool, True,
           "on CPU, decode steps now and then try half the threads and keep the faster count (a core shared with "
           "another process stalls every step; packserve.engine.threads); 0 keeps the count fixed"),
    EnvVar("GPU_DECODE_KERNEL", _bool, True,
           "on CUDA, every new token with cached context attends through the paged KV cache in place with "
           "packserve's Triton kernel (packserve.kernels.paged_attention_triton); 0 gathers the blocks and runs SDPA "
           "instead"),
    EnvVar("CACHE_DIR", str, None, "where the demo model and the CPU kernels are built (default: ~/.cache/packserve)", "--cache-dir"),
]

REGISTRY: dict[str, EnvVar] = {v.name: v for v in _VARS}


def get(name: str) -> Any:
    """The typed value of PACKSERVE_<name> (or its default)."""
    return REGISTRY[name.removeprefix(PREFIX)].get()


def options() -> list[EnvVar]:
    return [v for v in _VARS if v.flag is not None]
