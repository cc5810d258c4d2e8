"""packserve: an LLM inference server built around packed prefill."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import packserve.loadtest` does not pay for torch.
    if name == "LLM":
        from packserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from packserve.engine.request import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from packserve.engine.request import RequestOutput

        return RequestOutput
    raise AttributeError(name)
