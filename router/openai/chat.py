"""Chat messages to prompt token ids, through the model's chat template (the tokenizer's own, as
its tokenizer_config.json carries it, or one given with --chat-template), rendered by the
tokenizer's apply_chat_template as vLLM's server does. The template writes the special tokens
itself (BOS and the like), so the rendered text is tokenized without adding them again."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from router.errors import RequestError

if TYPE_CHECKING:  # annotations only: the CLI checks --chat-template without loading pydantic
    from router.openai.schema import ChatCompletionRequest, ChatMessage


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file holding a Jinja template, or the template itself (as vLLM takes it)."""
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as text: a string, or text parts joined by newlines."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError.invalid(
                f"messages.{index}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported, "
                f"got type {part.get('type')!r}", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def render_chat(tokenizer, request: ChatCompletionRequest, template: str | None) -> str:
    """The prompt text the chat template makes of the request's messages."""
    if not request.messages:
        raise RequestError.invalid("messages must not be empty", "messages")
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise RequestError.invalid("the model's tokenizer has no chat template (start the server with "
                                   "--chat-template FILE); /v1/completions works without one", "messages")
    if request.add_generation_prompt and request.continue_final_message:
        raise RequestError.invalid("add_generation_prompt and continue_final_message cannot both be true",
                                   "continue_final_message")
    conversation = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(request.messages)]
    try:
        return tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False,
            add_generation_prompt=bool(request.add_generation_prompt),
            continue_final_message=bool(request.continue_final_message),
            **(request.chat_template_kwargs or {}))
    except Exception as exc:  # a template that rejects the conversation (raise_exception, ...)
        raise RequestError.invalid(f"the chat template cannot render these messages: {exc}", "messages") from exc


def chat_prompt_ids(tokenizer, request: ChatCompletionRequest, template: str | None, max_model_len: int) -> list[int]:
    text = render_chat(tokenizer, request, template)
    # The same guard as for prompt text: nothing this long can fit, so don't spend time tokenizing it.
    if len(text) > 64 * max_model_len:
        raise RequestError.invalid(f"the messages make a prompt of {len(text)} characters, far beyond the "
                                   f"model's max length of {max_model_len} tokens", "messages")
    return list(tokenizer.encode(text, add_special_tokens=False))
