"""Edge validation, the same for every front door: a request's fields (GenerationParams, which
the gRPC GenerateRequest and the OpenAI JSON bodies both map into) become engine-ready token ids
and Sampling, or an INVALID_ARGUMENT RequestError whose message names the field and the allowed
range (and whose `param` names the field for the HTTP error object).

The limits and messages live here once; a transport only says where its fields are."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.protocol import Sampling
from router.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 256
MAX_SESSION_ID_CHARS = 256
# What the engine and the wire formats hold (vLLM seeds a 64-bit generator; proto int32/int64).
INT32 = (-(2 ** 31), 2 ** 31 - 1)
INT64 = (-(2 ** 63), 2 ** 63 - 1)


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    default_max_tokens: int
    # Longest prompt accepted (at most max_model_len - 1, so one token can be generated).
    max_prompt_tokens: int
    # Largest max_tokens accepted (0: no limit beyond the model's length).
    max_tokens_limit: int = 0


@dataclass(frozen=True)
class GenerationParams:
    """A request's fields as a client sent them, whatever the transport; None means unset
    (the server's default applies). Exactly one of prompt_text / prompt_token_ids is set."""

    prompt_text: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    ignore_eos: bool = False
    priority: int = 0
    request_id: str = ""
    session_id: str = ""


@dataclass(frozen=True)
class ValidatedRequest:
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    stop_strings: tuple[str, ...]
    priority: int
    client_request_id: str
    # The conversation this request is a turn of ("": none): prefix-aware routing keeps it on
    # the instance holding its history.
    session_id: str = ""


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise RequestError.invalid(f"{name} must be a finite number, got {value}", name)
    return value


def _in_range(name: str, value: int, bounds: tuple[int, int]) -> int:
    if not bounds[0] <= value <= bounds[1]:
        raise RequestError.invalid(f"{name} must be in [{bounds[0]}, {bounds[1]}], got {value}", name)
    return value


def _token_ids_in_vocab(name: str, ids, vocab_size: int, param: str) -> tuple[int, ...]:
    for i in ids:
        if i < 0 or i >= vocab_size:
            raise RequestError.invalid(f"{name} contains {i}, outside the vocabulary [0, {vocab_size})", param)
    return tuple(ids)


def validate_params(p: GenerationParams, tokenize: Callable[[str], list[int]], limits: Limits) -> ValidatedRequest:
    """The one validation core; `tokenize(text) -> list[int]` turns prompt text into ids."""
    if len(p.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError.invalid(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters", "request_id")
    if len(p.session_id) > MAX_SESSION_ID_CHARS:
        raise RequestError.invalid(f"session_id is longer than {MAX_SESSION_ID_CHARS} characters", "session_id")

    if p.prompt_text is not None:
        if not p.prompt_text:
            raise RequestError.invalid("prompt is empty: give prompt text or token ids", "prompt")
        # Reject absurd inputs before spending time tokenizing them (>= 1 char per token).
        if len(p.prompt_text) > 64 * limits.max_model_len:
            raise RequestError.invalid(
                f"prompt text of {len(p.prompt_text)} characters is far beyond the model's "
                f"max length of {limits.max_model_len} tokens", "prompt")
        prompt_ids = tuple(tokenize(p.prompt_text))
    elif p.prompt_token_ids is not None:
        prompt_ids = _token_ids_in_vocab("prompt token_ids", p.prompt_token_ids, limits.vocab_size, "prompt")
    else:
        raise RequestError.invalid("prompt is missing: set either text or token_ids", "prompt")
    if not prompt_ids:
        raise RequestError.invalid("prompt is empty after tokenization", "prompt")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise RequestError.invalid(
            f"prompt has {len(prompt_ids)} tokens; the limit is {limits.max_prompt_tokens} "
            f"(model max length {limits.max_model_len})", "prompt")

    room = limits.max_model_len - len(prompt_ids)
    if p.max_tokens is not None:
        max_tokens = p.max_tokens
        if max_tokens <= 0:
            raise RequestError.invalid(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if limits.max_tokens_limit and max_tokens > limits.max_tokens_limit:
            raise RequestError.invalid(f"max_tokens {max_tokens} is over this server's limit of "
                                       f"{limits.max_tokens_limit}", "max_tokens")
        if max_tokens > room:
            raise RequestError.invalid(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's max length of {limits.max_model_len}", "max_tokens")
    else:
        max_tokens = min(limits.default_max_tokens, room)
        if limits.max_tokens_limit:
            max_tokens = min(max_tokens, limits.max_tokens_limit)

    temperature = _finite("temperature", p.temperature) if p.temperature is not None else 1.0
    if temperature < 0:
        raise RequestError.invalid(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = _finite("top_p", p.top_p) if p.top_p is not None else 1.0
    if not 0 < top_p <= 1:
        raise RequestError.invalid(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = p.top_k if p.top_k is not None else 0
    if top_k < -1:
        raise RequestError.invalid(f"top_k must be -1 or 0 (disabled) or >= 1, got {top_k}", "top_k")
    if top_k > limits.vocab_size:
        raise RequestError.invalid(f"top_k must be <= the vocabulary size {limits.vocab_size}", "top_k")
    min_tokens = p.min_tokens if p.min_tokens is not None else 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise RequestError.invalid(f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens}",
                                   "min_tokens")
    seed = _in_range("seed", p.seed, INT64) if p.seed is not None else None
    priority = _in_range("priority", p.priority, INT32)

    if len(p.stop) > MAX_STOP_STRINGS:
        raise RequestError.invalid(f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
    for stop in p.stop:
        if not stop:
            raise RequestError.invalid("stop strings must not be empty", "stop")
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise RequestError.invalid(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters", "stop")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError.invalid(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed", "stop_token_ids")
    stop_ids = _token_ids_in_vocab("stop_token_ids", p.stop_token_ids, limits.vocab_size, "stop_token_ids")

    return ValidatedRequest(
        prompt_token_ids=prompt_ids,
        sampling=Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_tokens=min_tokens,
            stop_token_ids=stop_ids,
            seed=seed,
            ignore_eos=p.ignore_eos,
        ),
        stop_strings=tuple(p.stop),
        priority=priority,
        client_request_id=p.request_id,
        session_id=p.session_id,
    )


def params_from_proto(request) -> GenerationParams:
    """A disagg.v1.GenerateRequest's fields (proto3 `optional` presence is None when unset)."""
    s = request.sampling

    def optional(name: str):
        return getattr(s, name) if s.HasField(name) else None

    prompt_kind = request.WhichOneof("prompt")
    return GenerationParams(
        prompt_text=request.text if prompt_kind == "text" else None,
        prompt_token_ids=list(request.token_ids.ids) if prompt_kind == "token_ids" else None,
        max_tokens=optional("max_tokens"),
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        top_k=optional("top_k"),
        min_tokens=optional("min_tokens"),
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        seed=optional("seed"),
        ignore_eos=s.ignore_eos,
        priority=request.priority,
        request_id=request.request_id,
        session_id=request.session_id,
    )


def validate(request, tokenize: Callable[[str], list[int]], limits: Limits) -> ValidatedRequest:
    """`request` is a disagg.v1.GenerateRequest; `tokenize(text) -> list[int]`."""
    return validate_params(params_from_proto(request), tokenize, limits)
