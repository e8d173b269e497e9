"""What the HTTP API needs from a front end, and nothing more: stream one validated request.

Today the Router is that front end; after the front-end / global-scheduler split every front
end is. The API never reaches into the object behind this Protocol: placement, admission control,
deadlines, replay and migration stay behind `generate`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from router.validation import Limits, ValidatedRequest


class StreamChunk(Protocol):
    """One step of a request's stream (router.frontend.Chunk has these fields)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # length | stop | abort (set when finished)
    stop_reason: str  # the stop string, or the stop token id as text; "" for none
    prompt_tokens: int
    completion_tokens: int


class GenerateBackend(Protocol):
    def generate(self, request: ValidatedRequest) -> AsyncIterator[StreamChunk]:
        """The request's chunks, the last one finished. Raises router.errors.RequestError
        (admission control, no instance, replays exhausted, engine failure). Closing the
        iterator early (aclose, or cancelling the task awaiting it) aborts the request wherever
        it runs and frees its KV: that is how a client that goes away is handled."""
        ...


@dataclass(frozen=True)
class ServedModel:
    """The one model behind the API, as clients see it."""

    name: str  # the id in /v1/models and what requests put in `model`
    root: str  # where it was loaded from (vLLM's /v1/models `root`; its benchmark reads it)
    limits: Limits
    tokenizer: object  # a Hugging Face tokenizer: encode(), apply_chat_template()
    # A Jinja chat template replacing the tokenizer's own (None: the tokenizer's).
    chat_template: str | None = None
    created: int = 0  # unix time the server started

    def accepts(self, requested: str | None) -> bool:
        """A request may name the model by its served name or by where it was loaded from;
        leaving `model` out means this one (as vLLM does)."""
        return requested is None or requested in (self.name, self.root)


# () -> None when the server can take requests, else why it cannot (GET /health answers 503).
HealthCheck = Callable[[], "str | None"]
