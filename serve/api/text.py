"""Text prompts: encoding checks, tokenizing, and rendering chats through the chat template."""

from __future__ import annotations

from packserve.api.errors import APIError
from packserve.api.tool_calls import template_message
from packserve.checkpoints import CHAT_TEMPLATE


def chat_template(tokenizer) -> str:
    """The checkpoint's chat template, or the demo model's when it has none (documented in the README)."""
    return getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE


def check_text(text: str, param: str) -> None:
    """JSON may carry lone UTF-16 surrogates ("\ud800"), which no tokenizer can encode: a 400 naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                            f"{e.start}", param, "invalid_value") from None


def encode(state, text: str, param: str) -> list[int]:
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param)
    check_text(text, param)
    return state.tokenizer.encode(text, add_special_tokens=False) if text else []


def render_chat(state, req, add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: tuple[dict, ...] = ()) -> str:
    """req: anything with `messages` (a chat completion or a /tokenize request); tools: the function tools the
    template lists (tool_calls.ToolSetup.tools)."""
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if m.name is not None:
            check_text(m.name, f"messages[{i}].name")
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content part type {part.type!r} is not supported (text only)",
                                   f"messages[{i}].content", "unsupported_parameter")
                texts.append(part.text)
            content = "".join(texts)
        check_text(content or "", f"messages[{i}].content")
        messages.append({**template_message(i, m), "content": content or ""})
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so chat is unavailable", "messages")
    template = chat_template(state.tokenizer)
    try:
        return state.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                   continue_final_message=continue_final_message,
                                                   chat_template=template, tools=list(tools) or None)
    except Exception as exc:  # a template may raise on message orders it does not accept
        raise APIError(400, f"the chat template rejected these messages ({type(exc).__name__})",
                       "messages", "invalid_value") from None
