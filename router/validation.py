"""Edge validation: a GenerateRequest becomes engine-ready token ids and Sampling, or an
INVALID_ARGUMENT with a message that names the field and the allowed range."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.protocol import Sampling
from router.errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 256


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
class ValidatedRequest:
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    stop_strings: tuple[str, ...]
    priority: int
    client_request_id: str


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise RequestError.invalid(f"{name} must be a finite number, got {value}")
    return value


def _token_ids_in_vocab(name: str, ids, vocab_size: int) -> tuple[int, ...]:
    for i in ids:
        if i < 0 or i >= vocab_size:
            raise RequestError.invalid(f"{name} contains {i}, outside the vocabulary [0, {vocab_size})")
    return tuple(ids)


def validate(request, tokenize, limits: Limits) -> ValidatedRequest:
    """`request` is a disagg.v1.GenerateRequest; `tokenize(text) -> list[int]`."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError.invalid(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")

    prompt_kind = request.WhichOneof("prompt")
    if prompt_kind == "text":
        if not request.text:
            raise RequestError.invalid("prompt is empty: give prompt text or token ids")
        # Reject absurd inputs before spending time tokenizing them (>= 1 char per token).
        if len(request.text) > 64 * limits.max_model_len:
            raise RequestError.invalid(
                f"prompt text of {len(request.text)} characters is far beyond the model's "
                f"max length of {limits.max_model_len} tokens"
            )
        prompt_ids = tuple(tokenize(request.text))
    elif prompt_kind == "token_ids":
        prompt_ids = _token_ids_in_vocab("prompt token_ids", request.token_ids.ids, limits.vocab_size)
    else:
        raise RequestError.invalid("prompt is missing: set either text or token_ids")
    if not prompt_ids:
        raise RequestError.invalid("prompt is empty after tokenization")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise RequestError.invalid(
            f"prompt has {len(prompt_ids)} tokens; the limit is {limits.max_prompt_tokens} "
            f"(model max length {limits.max_model_len})"
        )

    s = request.sampling
    room = limits.max_model_len - len(prompt_ids)
    if s.HasField("max_tokens"):
        max_tokens = s.max_tokens
        if max_tokens <= 0:
            raise RequestError.invalid(f"max_tokens must be >= 1, got {max_tokens}")
        if limits.max_tokens_limit and max_tokens > limits.max_tokens_limit:
            raise RequestError.invalid(f"max_tokens {max_tokens} is over this server's limit of "
                                       f"{limits.max_tokens_limit}")
        if max_tokens > room:
            raise RequestError.invalid(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's max length of {limits.max_model_len}"
            )
    else:
        max_tokens = min(limits.default_max_tokens, room)
        if limits.max_tokens_limit:
            max_tokens = min(max_tokens, limits.max_tokens_limit)

    temperature = _finite("temperature", s.temperature) if s.HasField("temperature") else 1.0
    if temperature < 0:
        raise RequestError.invalid(f"temperature must be >= 0, got {temperature}")
    top_p = _finite("top_p", s.top_p) if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise RequestError.invalid(f"top_p must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < -1:
        raise RequestError.invalid(f"top_k must be -1 or 0 (disabled) or >= 1, got {top_k}")
    if top_k > limits.vocab_size:
        raise RequestError.invalid(f"top_k must be <= the vocabulary size {limits.vocab_size}")
    min_tokens = s.min_tokens if s.HasField("min_tokens") else 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise RequestError.invalid(f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens}")

    if len(s.stop) > MAX_STOP_STRINGS:
        raise RequestError.invalid(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
    for stop in s.stop:
        if not stop:
            raise RequestError.invalid("stop strings must not be empty")
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise RequestError.invalid(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError.invalid(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed")
    stop_ids = _token_ids_in_vocab("stop_token_ids", s.stop_token_ids, limits.vocab_size)

    return ValidatedRequest(
        prompt_token_ids=prompt_ids,
        sampling=Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_tokens=min_tokens,
            stop_token_ids=stop_ids,
            seed=s.seed if s.HasField("seed") else None,
            ignore_eos=s.ignore_eos,
        ),
        stop_strings=tuple(s.stop),
        priority=request.priority,
        client_request_id=request.request_id,
    )
