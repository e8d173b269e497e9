"""A front end's view of the deployment's engines: for each instance the scheduler lists, the
actor handle of its current incarnation, the load its own polls saw, and whether its own poll
failed. The scheduler's heartbeat replies keep it current; the pumps fill in the loads.

It holds no decisions (the scheduler places requests; `local_choice` is only the fallback
while the scheduler restarts) and no requests (those are in the front end's RequestTable).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cluster.protocol import InstanceInfo, LoadReport
from router.dispatcher import Candidate, fewest_queued_prompt_tokens, freest, least_loaded

SERVING_STATES = ("ready", "draining")


@dataclass
class EngineLink:
    info: InstanceInfo
    state: str  # the scheduler's word: starting | ready | draining | dead
    restarts: int  # the incarnation: a respawned engine is a new link
    actor: object | None = None
    load: LoadReport | None = None
    # This front end's poll of this incarnation failed (why); placements avoid it.
    failed: str | None = None
    failed_at: float = 0.0
    # This front end's requests there (client ids): dispatch counts them in the fallback.
    requests: set[str] = field(default_factory=set)
    pump: asyncio.Task | None = None

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def ready(self) -> bool:
        """Takes new requests (as this front end sees it)."""
        return self.state == "ready" and self.failed is None and self.actor is not None

    @property
    def serving(self) -> bool:
        return self.state in SERVING_STATES and self.failed is None and self.actor is not None

    @property
    def pumping(self) -> bool:
        return self.pump is not None and not self.pump.done()


def local_choice(links: list[EngineLink], role: str, exclude: set[str]) -> str | None:
    """Where this front end would place a request on its own (the scheduler is restarting):
    the dispatcher's policies over its own counts and the loads its polls saw."""
    ready = [link for link in links if link.role == role and link.ready and link.instance_id not in exclude]
    candidates = [Candidate(link.instance_id, len(link.requests), link.load.num_free_blocks if link.load else 0,
                            link.load.queued_prompt_tokens if link.load else 0) for link in ready]
    if role == "decode":
        return freest(candidates)
    if role == "prefill":
        return fewest_queued_prompt_tokens(candidates)
    return least_loaded(candidates)
