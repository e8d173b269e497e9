"""A front end's in-flight requests by id: the only per-request state a front end keeps, and
the inbox its engine pumps fill for each request's stream."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from router.errors import RequestError
from router.validation import ValidatedRequest


class Inbox:
    """(instance id, TokenDelta) items for one stream, in arrival order. A pump appends without
    waking anything unless the stream waits; the stream takes everything that piled up at once
    (one wake-up and, usually, one client message for several engine steps)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self):
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def put_nowait(self, item) -> None:
        self.put(item)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self):
        return self._items.popleft()

    async def take_all(self, timeout_s: float | None = None) -> list:
        """Everything queued, waiting for the first item (up to timeout_s: then [])."""
        if not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout_s is None:
                    await self._waiter
                else:
                    await asyncio.wait_for(self._waiter, timeout_s)
            except asyncio.TimeoutError:
                return []
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items


@dataclass
class RequestState:
    request_id: str
    request: ValidatedRequest
    arrival: float = field(default_factory=time.monotonic)
    arrival_wall: float = field(default_factory=time.time)
    # Deltas from the engines for this request's stream: (instance id, TokenDelta).
    deltas: Inbox = field(default_factory=Inbox)
    # Where the request runs now; its deltas are accepted from that instance only.
    instance_id: str | None = None
    served_by: list[str] = field(default_factory=list)
    # prefill -> decode for disaggregated requests; single when one engine serves it all.
    phase: str = "single"
    # The engine-side id of the current attempt ("<id>@<n>.<front end>", or a migration's
    # continuation of it); a replay starts a new attempt.
    engine_request_id: str = ""
    attempt: int = 0
    replays: int = 0
    # Engine-side ids of earlier attempts found still running (and aborted once).
    stale_aborted: set[str] = field(default_factory=set)
    # Deltas of engine-side ids the stream does not follow yet (a migration's destination can
    # answer before the source's marker arrives): id -> [(instance id, delta)].
    held: dict[str, list] = field(default_factory=dict)
    # Since when the stream follows a migration's continuation that has produced nothing yet.
    awaiting_continuation_since: float | None = None
    prefill_instance_id: str | None = None
    prefill_engine_id: str = ""
    prefill_tokens: int = 0
    # Layer-wise push: the decode instance chosen at dispatch that reserved blocks the prefill
    # pushes into (None: the decode side pulls after the prefill).
    push_instance_id: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    handoff_at: float | None = None
    abort_requested: bool = False
    finished: bool = False
    # A committed migration (its id) waiting for the destination's first token (its downtime).
    resumed_migration: str | None = None

    def follow(self, engine_request_id: str, instance_id: str) -> None:
        """The stream continues as `engine_request_id` on `instance_id`; deltas of any other id
        are stale from now on (but a migration's continuation of this one)."""
        self.engine_request_id = engine_request_id
        self.instance_id = instance_id


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
