"""The OpenAI request bodies this server reads, as strict pydantic models (a wrong type is a 400
that names the field, never a silent coercion). Fields vLLM added to the API (top_k, min_tokens,
ignore_eos, stop_token_ids, priority, request_id, add_generation_prompt) are here too, and our own
session_id (a conversation's turns stay on the instance holding its history).

Fields this server does not implement are declared with their neutral value so that a client
that sends the neutral value (as vLLM's benchmark sends repetition_penalty=1.0) is served, and
one that asks for more is refused by name (mapping.py), never ignored. Unknown fields are
ignored, as OpenAI's and vLLM's servers do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Sampling(_Strict):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extensions.
    top_k: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    priority: int | None = 0
    request_id: str | None = None
    # Our extension: the conversation this request is a turn of (prefix-aware routing keeps its
    # turns on the instance holding its history).
    session_id: str | None = None
    # Not implemented: accepted only at their neutral value (mapping.py refuses the rest).
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    min_p: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    use_beam_search: bool | None = False
    prompt_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    # A string, a list of token ids, or a batch of either (one item is accepted).
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id, ... pass through

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(...)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # vLLM's extensions.
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
