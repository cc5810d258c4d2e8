"""Tokenizer endpoints in vLLM's shapes: POST /tokenize (a prompt, or chat messages through the chat template),
POST /detokenize, and GET /tokenizer_info (what a client needs to tokenize the way the server does; lm-eval reads
it instead of fetching the tokenizer from the Hugging Face hub by model name).

Defaults follow vLLM: a prompt is tokenized with the tokenizer's special tokens (add_special_tokens=true), chat
messages without them (the template already writes them); /v1/completions and /v1/chat/completions have the same
defaults and the same add_special_tokens field, so /tokenize counts what they compute.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import anyio
from pydantic import Discriminator, Field, RootModel, StrictInt, Tag

from fastapi.responses import Response

from packserve.api.errors import APIError
from packserve.api.responses import json_bytes
from packserve.api.protocol import ChatMessage, _Model
from packserve.api.serving import check_model
from packserve.api.text import check_text, render_chat
from packserve.api.tool_calls import check_tools


class TokenizeCompletionRequest(_Model):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Model):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: list[Any] | None = Field(None, description="function tools the chat template lists, as in chat")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra chat template variables, as in chat")


TokenizeRequest = Union[TokenizeChatRequest, TokenizeCompletionRequest]


def _kind(value: Any) -> str:
    return "chat" if isinstance(value, dict) and "messages" in value else "prompt"


class TokenizeBody(RootModel[Annotated[Union[Annotated[TokenizeChatRequest, Tag("chat")],
                                             Annotated[TokenizeCompletionRequest, Tag("prompt")]],
                                       Discriminator(_kind)]]):
    """POST /tokenize: {"prompt": ...} or {"messages": [...]}."""


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[StrictInt]


def _check_model(state, model: str | None) -> None:
    check_model(state, model)
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", None, "no_tokenizer")


def _tokenize(state, body: TokenizeRequest) -> dict[str, Any]:
    if isinstance(body, TokenizeChatRequest):
        text = render_chat(state, body, add_generation_prompt=body.add_generation_prompt,
                           continue_final_message=body.continue_final_message,
                           tools=tuple(check_tools(body.tools)) if body.tools else ())
    else:
        check_text(body.prompt, "prompt")
        text = body.prompt
    ids = state.tokenizer.encode(text, add_special_tokens=body.add_special_tokens) if text else []
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
            "token_strs": state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}


async def tokenize(state, body: TokenizeRequest, limiter: anyio.CapacityLimiter | None = None) -> Response:
    """Tokenized and serialized off the event loop (a text of megabytes is millions of ids to write out);
    `limiter`: the server's limiter of big texts, for a big one."""
    _check_model(state, body.model)
    content = await anyio.to_thread.run_sync(lambda: json_bytes(_tokenize(state, body)), limiter=limiter)
    return Response(content, media_type="application/json")


async def detokenize(state, body: DetokenizeRequest) -> dict[str, Any]:
    _check_model(state, body.model)
    bad = next((t for t in body.tokens if not 0 <= t < state.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {state.vocab_size})", "tokens",
                       "invalid_value")
    return {"prompt": await anyio.to_thread.run_sync(state.tokenizer.decode, body.tokens)}


def tokenizer_info(state) -> dict[str, Any]:
    """The tokenizer's configuration: class, special tokens, chat template and the server's context length."""
    _check_model(state, None)
    tok = state.tokenizer
    info: dict[str, Any] = {
        "tokenizer_class": type(tok).__name__,
        "model_max_length": state.max_model_len,
        "vocab_size": state.vocab_size,
        "chat_template": getattr(tok, "chat_template", None),
    }
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        info[name] = value if isinstance(value, str) else None
        info[f"{name}_id"] = getattr(tok, f"{name}_id", None)
    info["add_bos_token"] = getattr(tok, "add_bos_token", None)
    info["add_eos_token"] = getattr(tok, "add_eos_token", None)
    return info
