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


def encode(state, text: str, param: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; add_special_tokens: the tokenizer's BOS/EOS as it adds them to a text (completions'
    default, as vLLM's; a rendered chat already holds what the template writes)."""
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param)
    check_text(text, param)
    return state.tokenizer.encode(text, add_special_tokens=add_special_tokens) if text else []


def _template_kwargs(kwargs: dict | None) -> dict:
    """A request's chat_template_kwargs: extra template variables, never one of apply_chat_template's own
    arguments (tokenize=True there would hand back ids where text is expected)."""
    if not kwargs:
        return {}
    reserved = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
    for key in kwargs:
        if key in reserved:
            raise APIError(400, f"chat_template_kwargs may not set {key!r} (set the request field instead, where "
                                "there is one)", "chat_template_kwargs", "invalid_value")
    return dict(kwargs)


def message_text(content) -> str:
    """A message's content as one string: a string, text parts joined, or "" for none."""
    if isinstance(content, list):
        return "".join(part.text or "" for part in content)
    return content or ""


def render_chat(state, req, add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: tuple[dict, ...] = ()) -> str:
    """req: anything with `messages` (a chat completion or a /tokenize request), and optionally
    `chat_template_kwargs`; tools: the function tools the template lists (tool_calls.ToolSetup.tools)."""
    if add_generation_prompt and continue_final_message:
        raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true (set "
                            "add_generation_prompt to false to continue the final message)",
                       "continue_final_message", "invalid_value")
    extra = _template_kwargs(getattr(req, "chat_template_kwargs", None))
    messages = []
    for i, m in enumerate(req.messages):
        if m.name is not None:
            check_text(m.name, f"messages[{i}].name")
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content part type {part.type!r} is not supported (text only)",
                                   f"messages[{i}].content", "unsupported_parameter")
        content = message_text(m.content)
        check_text(content, f"messages[{i}].content")
        messages.append({**template_message(i, m), "content": content})
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so chat is unavailable", "messages")
    template = chat_template(state.tokenizer)
    try:
        return state.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                   continue_final_message=continue_final_message,
                                                   chat_template=template, tools=list(tools) or None, **extra)
    except Exception as exc:  # a template may raise on message orders it does not accept
        raise APIError(400, f"the chat template rejected these messages ({type(exc).__name__})",
                       "messages", "invalid_value") from None
