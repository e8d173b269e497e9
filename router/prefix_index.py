"""PrefixIndex: which instance's KV cache holds which prompt prefix, as the engines report it,
and the prefix-aware choice of an instance for a prompt (the cost model). Pure logic, no I/O.

Names: a prefix is named by the chained hash of its last full block (cluster/kv/prefix_hash.py);
a prompt of n full blocks has n names, and an instance holds the prompt's first k blocks iff it
holds the first k names. Engines report their names as deltas in their snapshots
(cluster/engine/prefix_tracker.py); `apply` keeps one position per instance and takes a full
set when the engine sends one (first read, a lagging reader, a respawned engine).

The cost model (`choose`): the time to a request's first token on an instance is dominated by
the prompt tokens that instance computes before it — those queued ahead of it and its own
uncached ones — plus a fixed charge per request already running there (decode steps it shares
with on a colocated instance):

    cost(i) = queued_tokens(i) + (prompt_tokens - cached_tokens(i)) + request_cost_tokens * in_flight(i)

The cheapest instance wins (ties: more cached tokens, fewer in flight, smallest id). A cached
prefix therefore wins exactly as long as the tokens it saves exceed the extra queue it sits
behind; past that, load wins. Load-only routing is the same formula with cached_tokens = 0.

A conversation (session id) prefers the instance that served its previous turn (soft affinity:
its history is there even before the engine's report of it arrives): it stays there while
cost(session instance) <= cheapest cost + session_slack_tokens, and moves when load says
otherwise by more than that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Why an instance was chosen (the routing counters' labels).
REASONS = ("session", "prefix", "load", "load_over_prefix", "load_over_session")


class PrefixIndex:
    def __init__(self):
        self._holders: dict[int, set[str]] = {}
        self._names: dict[str, set[int]] = {}
        self._positions: dict[str, int] = {}

    def position(self, instance_id: str) -> int | None:
        """The journal position to read the instance's next report from (None: the full set)."""
        return self._positions.get(instance_id)

    def apply(self, instance_id: str, report: dict | None) -> None:
        """One report (PrefixTracker.read's reply) of `instance_id`."""
        if not report:
            return
        names = self._names.setdefault(instance_id, set())
        if "full" in report:
            full = set(report["full"])
            for name in names - full:
                self._drop(instance_id, name)
            for name in full - names:
                self._holders.setdefault(name, set()).add(instance_id)
            self._names[instance_id] = full
        else:
            for name in report.get("removed", ()):
                if name in names:
                    names.discard(name)
                    self._drop(instance_id, name)
            for name in report.get("added", ()):
                if name not in names:
                    names.add(name)
                    self._holders.setdefault(name, set()).add(instance_id)
        self._positions[instance_id] = int(report["seq"])

    def forget(self, instance_id: str) -> None:
        """The instance is gone (dead, respawned, removed): it holds nothing any more."""
        for name in self._names.pop(instance_id, set()):
            self._drop(instance_id, name)
        self._positions.pop(instance_id, None)

    def _drop(self, instance_id: str, name: int) -> None:
        holders = self._holders.get(name)
        if holders is not None:
            holders.discard(instance_id)
            if not holders:
                del self._holders[name]

    def matched_blocks(self, names: list[int], instance_ids: Iterable[str]) -> dict[str, int]:
        """For each instance: how many leading blocks of the prompt named `names` it holds."""
        wanted = set(instance_ids)
        matched = dict.fromkeys(wanted, 0)
        alive = set(wanted)
        for depth, name in enumerate(names):
            alive &= self._holders.get(name, set())
            if not alive:
                break
            for iid in alive:
                matched[iid] = depth + 1
        return matched

    def num_blocks(self, instance_id: str) -> int:
        return len(self._names.get(instance_id, ()))


@dataclass(frozen=True)
class RouteCandidate:
    instance_id: str
    queued_tokens: int  # prompt tokens queued there (reported + placed since the report)
    in_flight: int
    cached_tokens: int = 0  # this prompt's tokens its prefix cache holds


@dataclass(frozen=True)
class RouteConfig:
    use_prefix: bool = True
    request_cost_tokens: int = 0
    session_slack_tokens: int = 2048


@dataclass(frozen=True)
class Route:
    instance_id: str
    reason: str
    cached_tokens: int


def cost(c: RouteCandidate, prompt_tokens: int, config: RouteConfig) -> int:
    cached = min(c.cached_tokens, prompt_tokens) if config.use_prefix else 0
    return c.queued_tokens + (prompt_tokens - cached) + config.request_cost_tokens * c.in_flight


def choose(candidates: list[RouteCandidate], prompt_tokens: int, config: RouteConfig,
           session_instance: str | None = None) -> Route | None:
    """The instance for a prompt of `prompt_tokens` tokens (None: no candidates)."""
    if not candidates:
        return None

    def key(c: RouteCandidate):
        return (cost(c, prompt_tokens, config), -(c.cached_tokens if config.use_prefix else 0),
                c.in_flight, c.instance_id)

    best = min(candidates, key=key)
    best_cost = cost(best, prompt_tokens, config)
    if session_instance is not None:
        mine = next((c for c in candidates if c.instance_id == session_instance), None)
        if mine is not None:
            if cost(mine, prompt_tokens, config) <= best_cost + config.session_slack_tokens:
                return Route(mine.instance_id, "session", mine.cached_tokens)
            return Route(best.instance_id, "load_over_session", best.cached_tokens)
    if config.use_prefix and best.cached_tokens > 0:
        return Route(best.instance_id, "prefix", best.cached_tokens)
    if config.use_prefix and any(c.cached_tokens > 0 for c in candidates):
        return Route(best.instance_id, "load_over_prefix", best.cached_tokens)
    return Route(best.instance_id, "load", best.cached_tokens)
