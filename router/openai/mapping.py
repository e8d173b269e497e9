"""Pure mapping between the OpenAI API and the router: request bodies to GenerationParams (the
transport-neutral validation core does the rest), and a request's stream chunks to completion
and chat-completion objects (whole, or as server-sent-event chunks).

What this server does not implement is refused by name with a 400 (n > 1, logprobs, echo,
penalties, ...), never silently ignored."""

from __future__ import annotations

import grpc
from pydantic import ValidationError

from router.errors import RequestError
from router.openai.backend import ServedModel, StreamChunk
from router.openai.schema import ChatCompletionRequest, CompletionRequest
from router.validation import GenerationParams


def parse_body(model_cls, body: object):
    """A decoded JSON body as `model_cls`, or a 400 that names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError.invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"]) or None
        field = str(first["loc"][0]) if first["loc"] else None
        extra = f" ({exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise RequestError.invalid(f"{loc}: {first['msg']}{extra}" if loc else first["msg"], field) from None


def check_model(requested: str | None, model: ServedModel) -> None:
    if not model.accepts(requested):
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"The model `{requested}` does not exist; this server serves `{model.name}`",
                           param="model")


def _refuse(condition: bool, param: str, what: str) -> None:
    if condition:
        raise RequestError.invalid(f"{param}: {what}", param)


def _refuse_unsupported_sampling(req) -> None:
    _refuse(req.n not in (None, 1), "n", f"only n=1 is supported (one choice per request), got {req.n}")
    _refuse(bool(req.use_beam_search), "use_beam_search", "beam search is not supported")
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
                          ("min_p", 0.0)):
        value = getattr(req, name)
        _refuse(value is not None and value != neutral, name, f"is not supported (only {neutral:g}), got {value}")
    _refuse(bool(req.logit_bias), "logit_bias", "is not supported")
    _refuse(req.prompt_logprobs is not None, "prompt_logprobs", "logprobs are not supported yet")
    fmt = (req.response_format or {}).get("type", "text")
    _refuse(fmt != "text", "response_format", f"only type 'text' is supported, got {fmt!r}")
    _refuse(req.stream_options is not None and not req.stream, "stream_options",
            "is only allowed with stream=true")


def _stop(req) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def _common(req, max_tokens: int | None) -> dict:
    return dict(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_tokens=req.min_tokens, stop=_stop(req), stop_token_ids=list(req.stop_token_ids or ()),
        seed=req.seed, ignore_eos=bool(req.ignore_eos), priority=req.priority or 0,
        request_id=req.request_id or "", session_id=req.session_id or "",
    )


def completion_params(req: CompletionRequest) -> GenerationParams:
    _refuse_unsupported_sampling(req)
    _refuse(req.logprobs is not None, "logprobs", "logprobs are not supported yet")
    _refuse(bool(req.echo), "echo", "echoing the prompt is not supported")
    _refuse(req.best_of not in (None, 1), "best_of", f"only best_of=1 is supported, got {req.best_of}")
    _refuse(bool(req.suffix), "suffix", "is not supported")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        _refuse(len(prompt) != 1, "prompt", f"one prompt per request is supported, got a batch of {len(prompt)}")
        prompt = prompt[0]
    text = prompt if isinstance(prompt, str) else None
    ids = None if isinstance(prompt, str) else list(prompt)
    return GenerationParams(prompt_text=text, prompt_token_ids=ids, **_common(req, req.max_tokens))


def chat_params(req: ChatCompletionRequest, prompt_token_ids: list[int]) -> GenerationParams:
    """`prompt_token_ids`: the messages rendered by the chat template and tokenized."""
    _refuse(req.max_tokens is not None and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens, "max_completion_tokens",
            "max_tokens and max_completion_tokens disagree; give one")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return GenerationParams(prompt_token_ids=prompt_token_ids, **_common(req, max_tokens))


def refuse_unsupported_chat(req: ChatCompletionRequest) -> None:
    _refuse_unsupported_sampling(req)
    _refuse(bool(req.logprobs) or req.top_logprobs is not None, "logprobs", "logprobs are not supported yet")
    _refuse(bool(req.tools), "tools", "tool calling is not supported")
    _refuse(req.tool_choice not in (None, "none"), "tool_choice", "tool calling is not supported")


# ---------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _stop_reason(chunk: StreamChunk):
    """vLLM's `stop_reason`: the stop string, the stop token id, or None (EOS, length)."""
    reason = chunk.stop_reason
    if not reason:
        return None
    return int(reason) if chunk.finish_reason == "stop" and reason.isdigit() else reason


class ResponseBuilder:
    """The objects of one request's response: `completion` (text_completion) or `chat`
    (chat.completion), whole or as stream chunks, all with the same id, time and model."""

    def __init__(self, kind: str, request_id: str, model: str, created: int, include_usage: bool = False):
        if kind not in ("completion", "chat"):
            raise ValueError(kind)
        self.chat = kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self._sent_role = False

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, chunk: StreamChunk) -> dict:
        """One stream chunk for one router chunk (a final one carries finish_reason)."""
        finish = chunk.finish_reason if chunk.finished else None
        if self.chat:
            delta: dict = {"content": chunk.text}
            if not self._sent_role:
                delta = {"role": "assistant", "content": chunk.text}
                self._sent_role = True
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": finish}
        if chunk.finished:
            choice["stop_reason"] = _stop_reason(chunk)
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, final: StreamChunk) -> dict:
        """The extra last chunk of stream_options.include_usage: no choices, the usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(final.prompt_tokens, final.completion_tokens)
        return body

    def whole(self, text: str, final: StreamChunk) -> dict:
        """The non-streamed response: all the text and the final chunk's finish and usage."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": final.finish_reason, "stop_reason": _stop_reason(final)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.finish_reason,
                      "stop_reason": _stop_reason(final)}
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        body["usage"] = usage(final.prompt_tokens, final.completion_tokens)
        return body
