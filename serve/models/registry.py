"""Maps a checkpoint's `architectures` name to our model class."""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("packserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("packserve.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("packserve.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("packserve.models.llama", "Qwen3ForCausalLM"),
    "GPT2LMHeadModel": ("packserve.models.gpt2", "GPT2LMHeadModel"),
    "PackserveLinearAttentionForCausalLM": ("packserve.models.linear_attn", "PackserveLinearAttentionForCausalLM"),
}


class UnsupportedArchitecture(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve(config: dict):
    archs = config.get("architectures") or []
    for name in archs:
        if name in _REGISTRY:
            module, cls = _REGISTRY[name]
            return getattr(importlib.import_module(module), cls)
    raise UnsupportedArchitecture(
        f"unsupported architecture {archs or config.get('model_type')!r}; "
        f"supported: {', '.join(supported_architectures())}")
