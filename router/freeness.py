"""Freeness scheduling for the decode pool (pure logic, no engines, no Ray).

The router turns each decode instance's load report into one number, its *freeness*:

    freeness = (free KV blocks - virtual usage) / running requests

Virtual usage is load the instance does not carry yet but should be charged for:

* **de-fragmentation**: the blocks the head-of-line waiting request needs. An instance whose
  queue is blocked because that request does not fit looks full, so dispatch stops adding to
  it and pairing picks it as a migration source; moving a running request out frees room for
  the waiting one.
* **priority headroom**: ``FreenessConfig.high_priority_headroom_blocks`` are reserved on every
  instance. A normal-priority request (and the migration pairing) sees ``free - headroom``; a
  high-priority request may use the headroom.
* **draining**: infinite usage. A draining instance has freeness ``-inf``: never a dispatch or
  migration destination, and the first migration source.

Three decisions the router relies on, spelled out once here:

* The denominator is ``max(num_running, config.running_floor)`` (floor 1 by default), so an idle
  instance does not divide by zero and a busy instance's freeness is exactly "free blocks per
  running request", which keeps the thresholds readable. Idle and one-request instances with the
  same free blocks tie on freeness; the dispatch tie-break (fewer running first) settles it.
* When free blocks minus virtual usage is negative (a blocked queue, or an instance already
  eating into the headroom), freeness is that deficit in blocks, *not* divided by the running
  count: dividing would make a bigger batch look less loaded. Every such instance ranks below
  every instance with room, larger deficits lowest.
* All orderings end on ``instance_id`` / ``request_id``, so the same reports give the same
  decisions.

Priorities come from the gRPC request: larger is more urgent, 0 is normal, and a request is
*high-priority* when its priority is at least ``config.high_priority_threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.config import FreenessConfig


@dataclass(frozen=True)
class InstanceView:
    """One decode instance's load, as the router last saw it."""

    instance_id: str
    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    # Blocks the head-of-line waiting request needs (ignored when nothing waits).
    head_waiting_blocks: int = 0
    # Running requests with priority >= the config's high_priority_threshold.
    high_priority_running: int = 0
    # Being drained (scale-down, maintenance): move everything off, send nothing new.
    draining: bool = False
    # Already the source or destination of a migration: not a candidate for another one.
    migrating: bool = False

    def __post_init__(self) -> None:
        for name in ("num_total_blocks", "num_free_blocks", "num_running", "num_waiting",
                     "head_waiting_blocks", "high_priority_running"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_free_blocks > self.num_total_blocks:
            raise ValueError(
                f"num_free_blocks ({self.num_free_blocks}) exceeds num_total_blocks "
                f"({self.num_total_blocks})")


@dataclass(frozen=True)
class RequestView:
    """A running request on a migration source, for the selection policy."""

    request_id: str
    instance_id: str
    num_blocks: int
    num_tokens: int
    priority: int = 0
    # Seconds since the request arrived at the router: smaller means more recent.
    age_s: float = 0.0


def is_high_priority(priority: int, config: FreenessConfig) -> bool:
    return priority >= config.high_priority_threshold


def virtual_usage(view: InstanceView, config: FreenessConfig, request_priority: int = 0) -> float:
    """Blocks charged to the instance beyond those in use, as seen by a request of
    ``request_priority`` (the pairing uses the default, normal priority): ``inf`` when draining,
    else the head-of-line waiting request's blocks (when something waits) plus the priority
    headroom (unless the request is high-priority)."""
    if view.draining:
        return math.inf
    usage = view.head_waiting_blocks if view.num_waiting > 0 else 0
    if not is_high_priority(request_priority, config):
        usage += config.high_priority_headroom_blocks
    return float(usage)


def available_blocks(view: InstanceView, config: FreenessConfig, request_priority: int = 0) -> float:
    """Free blocks minus virtual usage: what a new request of that priority may take (may be
    negative; ``-inf`` when draining). Pass this as ``dst_free_blocks`` to ``select_request``."""
    return view.num_free_blocks - virtual_usage(view, config, request_priority)


def freeness(view: InstanceView, config: FreenessConfig, request_priority: int = 0) -> float:
    """Free blocks after virtual usage per running request; ``-inf`` when draining; the raw
    deficit (not divided) when negative. Larger is freer."""
    room = available_blocks(view, config, request_priority)
    if room < 0:
        return room  # -inf for draining, else the deficit in blocks
    return room / max(view.num_running, config.running_floor)


def pick_dispatch(views: list[InstanceView], config: FreenessConfig, needed_blocks: int,
                  priority: int = 0) -> str | None:
    """The freest instance (as a request of ``priority`` sees it) with room for
    ``needed_blocks`` after virtual usage; None when none fits. Draining instances never fit.
    Ties: higher freeness, then fewer running, then fewer waiting, then the smallest id."""
    best: tuple | None = None
    best_id: str | None = None
    for view in views:
        if view.draining or available_blocks(view, config, priority) < needed_blocks:
            continue
        key = (-freeness(view, config, priority), view.num_running, view.num_waiting,
               view.instance_id)
        if best is None or key < best:
            best, best_id = key, view.instance_id
    return best_id


def _has_movable(view: InstanceView) -> bool:
    """Whether a source could give anything up: a draining instance moves every request, any
    other moves only normal-priority ones (see ``select_request``)."""
    if view.num_running == 0:
        return False
    return view.draining or view.high_priority_running < view.num_running


def migration_sources(views: list[InstanceView], config: FreenessConfig) -> list[InstanceView]:
    """Instances that should migrate out, most loaded first: not already migrating, with a
    movable running request, and draining or below ``migrate_out_threshold``. Draining ones
    (freeness -inf) come first. Ties: more running first, then the smallest id."""
    out = []
    for view in views:
        if view.migrating or not _has_movable(view):
            continue
        f = freeness(view, config)
        if view.draining or f < config.migrate_out_threshold:
            out.append((f, -view.num_running, view.instance_id, view))
    out.sort(key=lambda t: t[:3])
    return [t[3] for t in out]


def migration_destinations(views: list[InstanceView], config: FreenessConfig) -> list[InstanceView]:
    """Instances that may take a migrated request, freest first: not draining, not migrating,
    freeness above ``migrate_in_threshold``. Ties: fewer running first, then the smallest id."""
    out = []
    for view in views:
        if view.draining or view.migrating:
            continue
        f = freeness(view, config)
        if f > config.migrate_in_threshold:
            out.append((-f, view.num_running, view.instance_id, view))
    out.sort(key=lambda t: t[:3])
    return [t[3] for t in out]


def pair_migrations(views: list[InstanceView], config: FreenessConfig) -> list[tuple[str, str]]:
    """Greedy pairing for one round: the i-th most loaded source with the i-th freest
    destination, each instance in at most one pair, never an instance with itself, at most
    ``max_pairs_per_round`` pairs. Returns (source_id, destination_id) pairs."""
    sources = migration_sources(views, config)
    destinations = migration_destinations(views, config)
    pairs: list[tuple[str, str]] = []
    used: set[str] = set()
    d = 0
    for src in sources:
        if len(pairs) >= config.max_pairs_per_round:
            break
        if src.instance_id in used:
            continue
        # The two lists are disjoint (thresholds are ordered, draining is -inf); the checks
        # below only guard against duplicate instance ids in the input.
        while d < len(destinations) and (destinations[d].instance_id in used
                                         or destinations[d].instance_id == src.instance_id):
            d += 1
        if d >= len(destinations):
            break
        dst = destinations[d]
        d += 1
        pairs.append((src.instance_id, dst.instance_id))
        used.update((src.instance_id, dst.instance_id))
    return pairs


def _policy_key(req: RequestView, selection: str) -> tuple:
    if selection == "last":
        return (req.age_s, req.num_blocks, req.request_id)
    if selection == "shortest":
        return (req.num_blocks, req.num_tokens, req.age_s, req.request_id)
    if selection == "longest":
        return (-req.num_blocks, -req.num_tokens, req.age_s, req.request_id)
    raise ValueError(f"unknown selection policy {selection!r}")


def select_request(requests: list[RequestView], config: FreenessConfig, dst_free_blocks: float,
                   source_draining: bool = False) -> RequestView | None:
    """The running request a source should move to a destination with ``dst_free_blocks``
    (use ``available_blocks(dst, config)``), or None.

    Only requests whose blocks fit are candidates. Priority comes before the policy: the least
    urgent request goes first (negative, then normal, then high). High-priority requests move
    only off a draining instance (``source_draining``); elsewhere they stay where they run.
    Within a priority the configured policy orders them, ending on ``request_id``."""
    best: tuple | None = None
    chosen: RequestView | None = None
    for req in requests:
        if req.num_blocks > dst_free_blocks:
            continue
        if is_high_priority(req.priority, config) and not source_draining:
            continue
        key = (req.priority, _policy_key(req, config.selection))
        if best is None or key < best:
            best, chosen = key, req
    return chosen
