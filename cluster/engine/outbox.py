"""Outbox: one engine's output deltas, queued per consumer (front end), and each consumer's
lease.

Every request names its owner, the front end whose stream it feeds; the engine's deltas wait
in that owner's queue until the owner polls. Front ends poll only their own queue, so many
front ends share an engine without seeing (or paying to deserialize) each other's tokens, and
a live-migrated or replayed request keeps its owner wherever it runs.

A consumer's lease is the time since it last polled (or added a request): the engine aborts
the requests of a consumer silent for longer than its orphan timeout (the front end died or
hangs) and drops its queue; other consumers are untouched.

Thread-safe: the engine's loop thread puts, Ray's actor threads take. It never touches the
engine itself. Leases are stamped with `clock` (tests pass a fake one so that lease expiry does
not depend on how fast a loaded machine runs); waiting in take() is always real time.
"""

from __future__ import annotations

import threading
import time

from cluster.protocol import TokenDelta


class Outbox:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._cond = threading.Condition()
        self._queues: dict[str, list[TokenDelta]] = {}
        self._last_seen: dict[str, float] = {}
        self._closed = False

    def put(self, owner: str, deltas: list[TokenDelta]) -> None:
        if not deltas:
            return
        with self._cond:
            self._queues.setdefault(owner, []).extend(deltas)
            self._cond.notify_all()

    def put_many(self, routed: list[tuple[str, TokenDelta]]) -> None:
        """(owner, delta) pairs, in order, under one lock."""
        if not routed:
            return
        with self._cond:
            for owner, delta in routed:
                queue = self._queues.get(owner)
                if queue is None:
                    queue = self._queues[owner] = []
                queue.append(delta)
            self._cond.notify_all()

    def take(self, owner: str, timeout_s: float) -> list[TokenDelta]:
        """Everything queued for `owner`, waiting up to timeout_s for the first delta (or
        until close()). Renews the owner's lease."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._last_seen[owner] = self.clock()
            while not self._queues.get(owner) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._last_seen[owner] = self.clock()
            return self._queues.pop(owner, None) or []

    def touch(self, owner: str) -> None:
        """The owner is alive (it just added a request): (re)starts its lease."""
        with self._cond:
            self._last_seen[owner] = self.clock()

    def silent_for(self, owner: str, now: float | None = None) -> float:
        """Seconds since the owner last polled or added; 0 for an owner never seen."""
        with self._cond:
            seen = self._last_seen.get(owner)
        if seen is None:
            return 0.0
        return (now if now is not None else self.clock()) - seen

    def leases(self) -> dict[str, float]:
        """{owner: seconds since it last polled or added}."""
        now = self.clock()
        with self._cond:
            return {owner: now - seen for owner, seen in self._last_seen.items()}

    def drop(self, owner: str) -> int:
        """Forgets an owner that is gone: its queued deltas (returned: how many) and lease."""
        with self._cond:
            self._last_seen.pop(owner, None)
            return len(self._queues.pop(owner, None) or [])

    def close(self) -> None:
        """Wakes every waiting take() for good (the engine stopped or failed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
