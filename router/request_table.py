"""In-flight requests by id: the router's only per-request state."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from router.errors import RequestError
from router.validation import ValidatedRequest


@dataclass
class RequestState:
    request_id: str
    request: ValidatedRequest
    arrival: float = field(default_factory=time.monotonic)
    # Deltas from the engines, in order, for this request's stream.
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Where the request runs now; its deltas are accepted from that instance only.
    instance_id: str | None = None
    served_by: list[str] = field(default_factory=list)
    # prefill -> decode for disaggregated requests; single when one engine serves it all.
    phase: str = "single"
    # The engine-side id of the current attempt ("<id>@<n>"); a replay starts a new attempt.
    engine_request_id: str = ""
    attempt: int = 0
    replays: int = 0
    prefill_instance_id: str | None = None
    prefill_engine_id: str = ""
    prefill_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    handoff_at: float | None = None
    abort_requested: bool = False
    finished: bool = False
    # Live migration in progress (a MigrationRecord), set while the router's coordinator runs.
    migration: object | None = None
    # Set by the stream when the source's "migrated" delta arrived (all its tokens are in).
    migration_stopped: asyncio.Event = field(default_factory=asyncio.Event)
    # The balancer leaves the request alone until then (its last migration was refused).
    migration_backoff_until: float = 0.0
    # A committed migration waiting for the destination's first token (its downtime).
    resumed_migration: object | None = None


class RequestTable:
    def __init__(self):
        self._requests: dict[str, RequestState] = {}

    def add(self, state: RequestState) -> None:
        if state.request_id in self._requests:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request id {state.request_id!r} is already in flight",
            )
        self._requests[state.request_id] = state

    def get(self, request_id: str) -> RequestState | None:
        return self._requests.get(request_id)

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self):
        return iter(list(self._requests.values()))
