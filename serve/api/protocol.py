"""Pydantic models of the OpenAI completions and chat APIs (the request side).

Unknown fields are ignored (as vLLM does). Known OpenAI fields that packserve
does not implement are accepted by the schema but rejected with 400 when set to
a non-default value (`unsupported_fields`), so a client never silently gets
behaviour it did not ask for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, TypeAdapter, WithJsonSchema

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(False, description="usage so far in every chunk (vLLM's extra)")


class _SamplingFields(_Model):
    model: str | None = Field(None, description="served model name; omitted = the only served model")
    temperature: float | None = Field(None, description="0 = greedy; default 1")
    top_p: float | None = None
    top_k: int | None = Field(None, description="0 or -1 disables")
    min_p: float | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    allowed_token_ids: list[StrictInt] | None = Field(None, description="sample only among these token ids")
    return_tokens_as_token_ids: bool = Field(False, description="logprob tokens as \"token_id:N\"")
    bad_words: list[str] | None = Field(None, description="words never to generate (vLLM's extra)")
    # Structured outputs, vLLM's extras (packserve.api.structured); OpenAI's response_format is per request type.
    guided_json: dict[str, Any] | str | None = Field(None, description="a JSON schema the output must match")
    guided_regex: str | None = Field(None, description="a regex the output must match")
    guided_choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    guided_grammar: str | None = Field(None, description="an EBNF grammar (xgrammar's GBNF dialect)")
    structured_outputs: dict[str, Any] | None = Field(None, description="{json | regex | choice | grammar: ...}")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100], added to the "
                                                                  "logits before sampling")


# StrictInt: `true` is not token id 1.
PromptType = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


def _check_prompt(value: Any) -> Any:
    """PromptType, checked in plain Python: pydantic's union validation of a million token ids held the GIL for
    ~0.3 s (the event loop stalls even with parsing in a worker thread); a Python loop yields it every few ms."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value or (type(value[0]) is str and all(type(x) is str for x in value)):
            return value
        if type(value[0]) is int and all(type(x) is int for x in value):  # type(True) is bool, not int
            return value
        if all(isinstance(x, list) and all(type(t) is int for t in x) for x in value):
            return value
    raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers), or a list of "
                     "token-id lists")


Prompt = Annotated[Any, PlainValidator(_check_prompt), WithJsonSchema(TypeAdapter(PromptType).json_schema())]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = Field(None, description="not supported: must be empty")
    response_format: dict[str, Any] | None = Field(None, description="{\"type\": \"text\" | \"json_object\" | "
                                                                   "\"json_schema\", \"json_schema\": {...}}")
    best_of: int | None = Field(None, description="candidates generated per prompt (>= n, not with stream); the n "
                                                   "with the highest cumulative logprob are returned")
    add_special_tokens: bool = Field(True, description="text prompts get the tokenizer's special tokens (BOS)")


class TextPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant's past tool calls")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = Field(None, description="{\"type\": \"text\" | \"json_object\" | "
                                                                   "\"json_schema\", \"json_schema\": {...}}")
    tools: list[Any] | None = Field(None, description="function tools: [{\"type\": \"function\", \"function\": "
                                                      "{\"name\", \"description\", \"parameters\"}}]")
    tool_choice: Any = Field(None, description="\"none\", \"auto\" (default with tools), \"required\", or "
                                               "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call")
    functions: list[Any] | None = Field(None, description="not supported: must be empty")
    function_call: Any = Field(None, description="not supported: must be \"none\"")
    audio: Any = Field(None, description="not supported")
    modalities: list[str] | None = Field(None, description="only [\"text\"]")
    prediction: Any = Field(None, description="not supported")
    # vLLM's prompt-rendering extras.
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant turn's header")
    continue_final_message: bool = Field(False, description="the reply continues the final (assistant) message; "
                                                            "needs add_generation_prompt=false")
    echo: bool = Field(False, description="the reply starts with the final message's content when that message "
                                          "is the assistant's")
    add_special_tokens: bool = Field(False, description="add the tokenizer's special tokens to the rendered chat "
                                                        "(templates usually write them)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the chat template "
                                                                          "(e.g. {\"enable_thinking\": false})")
    chat_template: str | None = Field(None, description="not supported: the server's template is used")


def _set(value) -> bool:
    return value not in (None, "", [], {})


def unsupported_fields(req: _SamplingFields) -> str | None:
    """The first known-but-unsupported field set to a non-default value, or None."""
    if isinstance(req, CompletionRequest):
        if _set(req.suffix):
            return "suffix"
        return None
    assert isinstance(req, ChatCompletionRequest)
    if _set(req.functions):
        return "functions"
    if req.function_call not in (None, "none"):
        return "function_call"
    if req.audio is not None:
        return "audio"
    if req.modalities is not None and list(req.modalities) != ["text"]:
        return "modalities"
    if req.prediction is not None:
        return "prediction"
    if req.chat_template is not None:  # a request's own Jinja is untrusted code (vLLM refuses it by default too)
        return "chat_template"
    return None
