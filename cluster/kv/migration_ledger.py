"""MigrationLedger: a decode worker's bookkeeping for live migration, shared (in-process) by the
worker actor and the scheduler-side KV connector, like the KVTransferAgent it hangs off.

Source side: requests being stopped for migration; when vLLM frees such a request the
connector keeps its not-yet-copied blocks as a hold for the destination to pull.

Destination side: reservations, blocks taken from the pool before the request exists here.
Stages write into them; at commit the new request adopts them as its first blocks (no copy).
A reservation nobody commits or cancels (the source or the router died) expires.

Block-pool operations must run on the engine's loop thread: the worker supplies them as
callbacks (`take_blocks`, `free_blocks`, `adopt_blocks`) and calls the methods that use them
on that thread; the connector already runs there.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from cluster.kv.layout import blocks_for_tokens

log = logging.getLogger(__name__)


@dataclass
class Reservation:
    blocks: list = field(default_factory=list)  # vLLM KVCacheBlock objects, in sequence order
    deadline: float = 0.0
    # Tokens whose KV the blocks hold, set at commit.
    num_tokens: int = 0
    committed: bool = False
    # The committed request (vLLM's internal id) took the blocks; from then on vLLM owns them.
    adopted_by: str | None = None

    @property
    def adopted(self) -> bool:
        return self.adopted_by is not None

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


@dataclass(frozen=True)
class StopMark:
    transfer_id: str
    from_block: int


class MigrationLedger:
    def __init__(self, reservation_timeout_s: float = 60.0):
        self.reservation_timeout_s = reservation_timeout_s
        self._lock = threading.Lock()
        self._stopping: dict[str, StopMark] = {}  # internal id -> mark (source)
        self._reservations: dict[str, Reservation] = {}  # migration id -> reservation (destination)
        self.expired_reservations = 0
        # Loop-thread callbacks set by the worker.
        self.take_blocks = None  # (num_blocks) -> list | None
        self.free_blocks = None  # (blocks) -> None
        self.adopt_blocks = None  # (internal_id, blocks) -> None

    # ---- source ----
    def mark_stopping(self, internal_id: str, transfer_id: str, from_block: int) -> None:
        with self._lock:
            self._stopping[internal_id] = StopMark(transfer_id, from_block)

    def take_stop_mark(self, internal_id: str) -> StopMark | None:
        with self._lock:
            return self._stopping.pop(internal_id, None)

    # ---- destination (loop thread) ----
    def reserve(self, migration_id: str, total_blocks: int) -> list[int] | None:
        """Grows the reservation of `migration_id` to `total_blocks`; its block ids, or None
        (and nothing changed) when the pool cannot spare them."""
        with self._lock:
            res = self._reservations.get(migration_id)
        if res is not None and res.committed:
            raise RuntimeError(f"migration {migration_id} is already committed")
        have = len(res.blocks) if res is not None else 0
        new = self.take_blocks(total_blocks - have) if total_blocks > have else []
        if new is None:
            return None
        with self._lock:
            res = self._reservations.setdefault(migration_id, Reservation())
            res.blocks.extend(new)
            res.deadline = time.monotonic() + self.reservation_timeout_s
            return res.block_ids

    def block_ids(self, migration_id: str) -> list[int] | None:
        with self._lock:
            res = self._reservations.get(migration_id)
            return None if res is None else res.block_ids

    def commit(self, migration_id: str, num_tokens: int, block_size: int) -> None:
        """The request is about to be added: its first `num_tokens` tokens' KV is reserved.
        Blocks beyond what those tokens need go back to the pool."""
        with self._lock:
            res = self._reservations.get(migration_id)
            if res is None:
                raise KeyError(f"no reservation for migration {migration_id}")
            needed = blocks_for_tokens(num_tokens, block_size)
            if needed > len(res.blocks):
                raise RuntimeError(f"migration {migration_id}: {num_tokens} tokens need {needed} "
                                   f"blocks, {len(res.blocks)} reserved")
            spare, res.blocks = res.blocks[needed:], res.blocks[:needed]
            res.num_tokens, res.committed = num_tokens, True
        self.free_blocks(spare)

    def cancel(self, migration_id: str) -> bool:
        """Frees an uncommitted (or committed but never adopted) reservation."""
        with self._lock:
            res = self._reservations.get(migration_id)
            if res is None or res.adopted:
                return False
            del self._reservations[migration_id]
        self.free_blocks(res.blocks)
        return True

    def expire(self) -> int:
        now = time.monotonic()
        with self._lock:
            expired = [m for m, r in self._reservations.items() if not r.committed and r.deadline < now]
        n = 0
        for migration_id in expired:
            if self.cancel(migration_id):
                log.warning("migration reservation %s expired; freed its blocks", migration_id)
                n += 1
        self.expired_reservations += n
        return n

    def reserved_blocks(self) -> int:
        with self._lock:
            return sum(len(r.blocks) for r in self._reservations.values() if not r.adopted)

    # ---- destination, scheduler-side connector (loop thread) ----
    def tokens_for(self, migration_id: str, internal_id: str) -> int:
        """KV tokens a committed migration brings; the first call hands the blocks to the
        request. 0 once adopted (a preempted request recomputes like any other)."""
        with self._lock:
            res = self._reservations.get(migration_id)
            if res is None or not res.committed:
                return 0
            if res.adopted:  # vLLM asks again after failing to allocate the rest
                return res.num_tokens if res.adopted_by == internal_id else 0
            res.adopted_by = internal_id
            blocks = res.blocks
        self.adopt_blocks(internal_id, blocks)
        return res.num_tokens

    def running(self, migration_id: str) -> None:
        """vLLM allocated the rest and scheduled the request: the reservation is done."""
        with self._lock:
            self._reservations.pop(migration_id, None)

    def finished(self, migration_id: str) -> None:
        """The request ended (e.g. aborted) before it ran: adopted blocks went with it."""
        with self._lock:
            res = self._reservations.get(migration_id)
            if res is None:
                return
            if res.adopted:
                del self._reservations[migration_id]
                return
        self.cancel(migration_id)
