"""The global scheduler's view of one engine actor: its info, latest load, the requests it
runs (from its snapshots) and those placed on it that its snapshots do not show yet."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from cluster.protocol import InstanceInfo, LiveRequest, LoadReport, client_request_id

# A placement a snapshot taken this long after it does not show did not happen, or already
# ended (a short prefill can start and finish between two snapshots). Long enough for the front
# end's add to reach the engine and the engine's loop to take it.
PENDING_TTL_S = 2.0


@dataclass(frozen=True)
class Pending:
    """A request placed on an instance by the scheduler, before the instance reports it."""

    engine_request_id: str
    request_id: str
    num_tokens: int
    priority: int = 0
    owner: str = ""
    placed_at: float = field(default_factory=time.monotonic)


class InstanceState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass
class Instance:
    info: InstanceInfo
    actor: object
    state: InstanceState = InstanceState.READY
    load: LoadReport | None = None
    in_flight: set[str] = field(default_factory=set)
    # Prompt tokens of requests placed here whose first token has not come back (prefill work).
    queued_prompt_tokens: int = 0
    requests_served: int = 0
    death_reason: str | None = None
    restarts: int = 0
    # Id of the migration this instance is the source or destination of (one at a time).
    migrating: str | None = None
    # Engine-side id -> the request, as the instance's last snapshot showed it.
    requests: dict[str, LiveRequest] = field(default_factory=dict)
    # Engine-side id -> placed here but not in a snapshot yet (counted by dispatch meanwhile).
    pending: dict[str, Pending] = field(default_factory=dict)
    # When the last snapshot arrived (monotonic; 0: never).
    reported_at: float = 0.0

    def observe(self, load: LoadReport, requests, now: float | None = None) -> None:
        """A snapshot arrived: it replaces the request list; placements it shows (or too old
        to still be on their way) stop being pending; in_flight follows."""
        now = time.monotonic() if now is None else now
        self.load = load
        self.reported_at = now
        self.requests = {r.request_id: r for r in requests}
        for engine_id in [e for e, p in self.pending.items()
                          if e in self.requests or now - p.placed_at > PENDING_TTL_S]:
            del self.pending[engine_id]
        self.in_flight = {client_request_id(e) for e in self.requests} | {p.request_id for p in self.pending.values()}

    def place(self, pending: Pending) -> None:
        self.pending[pending.engine_request_id] = pending
        self.in_flight.add(pending.request_id)

    def unplace(self, engine_request_id: str) -> None:
        """A placement that did not happen after all (the add failed)."""
        pending = self.pending.pop(engine_request_id, None)
        if pending is not None and pending.request_id not in {client_request_id(e) for e in self.requests}:
            self.in_flight.discard(pending.request_id)

    def pending_prompt_tokens(self) -> int:
        return sum(p.num_tokens for p in self.pending.values())

    def priorities(self):
        """Priorities of the requests on the instance (reported and pending)."""
        yield from (r.priority for r in self.requests.values())
        yield from (p.priority for p in self.pending.values() if p.engine_request_id not in self.requests)

    def forget_requests(self) -> None:
        """A fresh engine (respawned): nothing of the old one's runs there."""
        self.requests.clear()
        self.pending.clear()
        self.in_flight.clear()
        self.queued_prompt_tokens = 0

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def ready(self) -> bool:
        """Takes new requests."""
        return self.state == InstanceState.READY

    @property
    def serving(self) -> bool:
        """Runs requests (a draining instance still finishes or hands off its own)."""
        return self.state in (InstanceState.READY, InstanceState.DRAINING)
