"""The router's view of one worker actor: its info, latest load and the requests placed on it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cluster.protocol import InstanceInfo, LoadReport


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
