"""DecodeWorker: a vLLM engine as KV consumer, and both ends of live migration.

A transferred request arrives as prompt + first token with `do_remote_prefill`; vLLM's
scheduler allocates its blocks and parks it while its ranks pull the prompt's KV from the
prefill worker's ranks, then computes only the first token's KV and decodes on with continuous
batching.

Live migration (the global scheduler's coordinator, router/migration.py, drives these steps):
- source: `migrate_out_stage` exposes the blocks filled since the last stage while the request
  keeps decoding; `migrate_out_stop` ends it here (its stream's "migrated" marker tells the
  front end where it continues), holds the remaining blocks and keeps the continuation until
  `migrate_out_done` confirms the commit (a restarted scheduler finishes what it finds);
- destination: `migrate_in_reserve` pre-allocates blocks, `migrate_in_pull` copies a stage
  into them, `migrate_in_commit` adds the request, which adopts them; `migrate_in_cancel`
  (or the reservation deadline) frees them.

Prefix caching stays off on decode engines: adopting reserved blocks bypasses the block hashes
the prefix cache keeps, and no prompt is ever prefilled here (engine_config_for in
cluster/entrypoints/deployment.py turns it off per pool; README, "Prefix reuse").
"""

from __future__ import annotations

import dataclasses
import logging
import time

from cluster.engine.worker import EngineWorker, KVWorkerMixin
from cluster.kv.connector.metadata import PushTarget
from cluster.kv.connector.scheduler import SourceRef, release_at_source
from cluster.kv.layout import blocks_for_tokens
from cluster.protocol import (
    EngineRequest,
    EngineSnapshot,
    push_reservation_id,
    stage_transfer_id,
    tail_transfer_id,
)
from decode_worker import migration_adapter as ma
from decode_worker.speculation import TetrisMixin

log = logging.getLogger(__name__)

# Longest a migration step waits for the engine loop (one step, normally milliseconds).
LOOP_CALL_TIMEOUT_S = 10.0


class DecodeWorker(TetrisMixin, KVWorkerMixin, EngineWorker):
    role = "decode"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        engine = self.loop.engine
        ledger = self.kv.migrations
        ledger.reservation_timeout_s = self.transfer.hold_timeout_s
        ledger.take_blocks = lambda n: ma.reserve_blocks(engine, n, self._keep_free)
        ledger.free_blocks = lambda blocks: ma.free_blocks(engine, blocks)
        ledger.adopt_blocks = lambda internal_id, blocks: ma.adopt_blocks(engine, internal_id, blocks)
        self.loop.housekeeping.append(ledger.expire)
        self._keep_free = 1
        self._migration_unsupported = ma.migration_supported(engine)
        # Migration ids with a reservation here not yet committed (destination), with stage
        # views here (source), and requests stopped here whose commit is not confirmed yet.
        self._incoming: set[str] = set()
        self._outgoing: set[str] = set()
        self._stopped: dict[str, dict] = {}
        self.loop.on_refused = self._free_refused

    def add_transferred(self, request: EngineRequest, source_id: str, source, num_tokens: int,
                        source_node: str | None = None) -> None:
        """Admit a request whose first `num_tokens` tokens' KV lives on `source` (an actor)."""
        transfer_id = request.kv_transfer["transfer_id"]
        self.kv.expect(transfer_id, SourceRef(source_id, source), num_tokens)
        try:
            self.loop.add(request)
        except Exception:
            self.kv.forget(transfer_id)
            raise

    def abort(self, request_ids: list[str]) -> None:
        self.loop.abort(request_ids)
        for request_id in request_ids:  # a load not started yet releases its source now
            self.kv.forget(request_id)

    # ---- migration, source side ----
    def migrate_out_stage(self, request_id: str, migration_id: str, stage: int, from_block: int) -> dict:
        """Exposes the request's full blocks from `from_block` on for one pull, while it keeps
        running. Returns its progress; status other than "ok" means: do not migrate."""

        def on_loop(loop):
            progress = self._progress(loop, request_id)
            if progress is None or progress.status != "running":
                return {"status": progress.status if progress else "gone"}
            full = progress.full_blocks(self.kv.block_size)
            blocks = list(progress.block_ids[from_block:full])
            transfer_id = stage_transfer_id(migration_id, stage)
            self.kv.hold_view(transfer_id, loop.internal_id(request_id), blocks, full * self.kv.block_size)
            return {"status": "ok", "transfer_id": transfer_id, "full_blocks": full,
                    "num_blocks": len(blocks), "num_computed_tokens": progress.num_computed_tokens,
                    "num_tokens": progress.num_tokens, "preemptions": progress.num_preemptions}

        out = self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)
        if out["status"] == "ok":
            self._outgoing.add(migration_id)
        return out

    def migrate_out_stop(self, request_id: str, migration_id: str, from_block: int, preemptions: int,
                         continuation: dict | None = None) -> dict:
        """Stops the request here (its stream ends with finish reason "migrated", after every
        token it produced) and holds its blocks from `from_block` on for the destination.
        Refuses if it finished, or was preempted since the stages began (their blocks may have
        been reused): the request then simply keeps running here.

        `continuation` ({"request_id": new engine id, "instance_id": destination}) goes into
        the "migrated" marker, so the front end knows where its stream continues; the reply's
        "request" is that continuation (prompt + every token produced here, the budget left,
        the same owner), kept here until migrate_out_done()."""

        def on_loop(loop):
            progress = self._progress(loop, request_id)
            if progress is None or progress.status == "finished":
                return {"status": "gone"}
            # preemptions < 0: no stage ran (stop_copy / recompute), nothing staged can be stale.
            if progress.status != "running" or 0 <= preemptions != progress.num_preemptions:
                return {"status": "preempted"}
            transfer_id = tail_transfer_id(migration_id)
            marker, request = {}, None
            if continuation is not None:
                request = loop.continuation(request_id, continuation["request_id"])
                marker = {"migration_id": migration_id, "migrated_to": continuation["instance_id"],
                          "continued_as": continuation["request_id"]}
                self._stopped[migration_id] = {"request": request, "target": continuation["instance_id"],
                                               "at": time.monotonic()}
            self.kv.migrations.mark_stopping(loop.internal_id(request_id), transfer_id, from_block)
            loop.end_request(request_id, "migrated", **marker)
            tail = max(0, blocks_for_tokens(progress.num_computed_tokens, self.kv.block_size) - from_block)
            return {"status": "stopped", "transfer_id": transfer_id, "num_blocks": tail,
                    "num_computed_tokens": progress.num_computed_tokens, "num_tokens": progress.num_tokens,
                    "request": request}

        return self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)

    def migrate_out_cancel(self, migration_id: str) -> int:
        """Drops the stage views of an abandoned migration (the request keeps running)."""
        self._outgoing.discard(migration_id)
        return self.kv.release_views(f"{migration_id}#")

    def migrate_out_done(self, migration_id: str) -> bool:
        """The request stopped for `migration_id` runs elsewhere now: forget its continuation."""
        self._outgoing.discard(migration_id)
        return self._stopped.pop(migration_id, None) is not None

    @staticmethod
    def _progress(loop, request_id: str):
        internal = loop.internal_id(request_id)
        return None if internal is None else ma.request_progress(loop.engine, internal)

    # ---- migration, destination side ----
    def migrate_in_reserve(self, migration_id: str, total_blocks: int, keep_free: int = 1) -> dict:
        """Grows the reservation to `total_blocks` blocks, keeping `keep_free` blocks free for
        new requests. status: ok (block ids) | no_memory | unsupported."""
        if self._migration_unsupported:
            return {"status": "unsupported", "reason": self._migration_unsupported}

        def on_loop(loop):
            self._keep_free = keep_free
            ids = self.kv.migrations.reserve(migration_id, total_blocks)
            return {"status": "no_memory"} if ids is None else {"status": "ok", "block_ids": ids}

        out = self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)
        if out["status"] == "ok":
            self._incoming.add(migration_id)
        return out

    def migrate_in_pull(self, migration_id: str, source_id: str, source, source_node: str | None,
                        transfer_id: str, first_block: int, num_blocks: int, timeout_s: float) -> int:
        """Copies the source's hold `transfer_id` into reserved blocks [first_block,
        first_block + num_blocks). Runs beside the engine: nothing but us uses those blocks."""
        ids = self.kv.migrations.block_ids(migration_id)
        ref = SourceRef(source_id, source)
        if num_blocks == 0 or ids is None or first_block + num_blocks > len(ids):
            release_at_source(ref, transfer_id)  # nothing to copy, or nowhere to put it
            if num_blocks == 0:
                return 0
            raise RuntimeError(f"migration {migration_id}: blocks {first_block}+{num_blocks} not reserved")
        return self.kv.pull(ref, transfer_id, ids[first_block:first_block + num_blocks], timeout_s)

    def migrate_in_commit(self, migration_id: str, request: EngineRequest, num_tokens: int) -> None:
        """Adds the request (prompt + every token so far); its first `num_tokens` tokens' KV is
        in the reservation, which it adopts when vLLM schedules it."""

        def on_loop(loop):
            self.kv.migrations.commit(migration_id, num_tokens, self.kv.block_size)

        self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)
        self._incoming.discard(migration_id)
        try:
            self.loop.add(request)
        except Exception:
            self.loop.call(lambda loop: self.kv.migrations.cancel(migration_id), LOOP_CALL_TIMEOUT_S)
            raise

    def migrate_in_cancel(self, migration_id: str) -> bool:
        self._incoming.discard(migration_id)
        return self.loop.call(lambda loop: self.kv.migrations.cancel(migration_id), LOOP_CALL_TIMEOUT_S)

    # ---- layer-wise push (Splitwise), destination side ----
    def push_reserve(self, transfer_id: str, num_tokens: int) -> dict:
        """Reserves blocks for a prompt of `num_tokens` tokens that a prefill engine will push here
        layer by layer while it computes it. status: ok (block ids and this engine's rank
        endpoints, as a PushTarget's plain data for the prefill) | no_memory | unsupported: the
        front end then pulls instead."""
        if self._migration_unsupported:
            return {"status": "unsupported", "reason": self._migration_unsupported}
        key = push_reservation_id(transfer_id)

        def on_loop(loop):
            return self.kv.migrations.reserve(key, blocks_for_tokens(num_tokens, self.kv.block_size))

        ids = self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)
        if ids is None:
            return {"status": "no_memory"}
        self.kv.expect_push(transfer_id, ids)
        return {"status": "ok", "target": PushTarget(self.instance_id, tuple(self.kv.ranks), tuple(ids)).to_wire()}

    def push_commit(self, transfer_id: str, request: EngineRequest, num_tokens: int, source_id: str, source,
                    timeout_s: float) -> str:
        """The prefill finished: once every rank holds the whole push, adds the request (prompt +
        first token, as add_transferred gets it), which adopts the reserved blocks and computes
        one token. A push that did not complete falls back to pulling the prefill's hold, which
        is still there (and that to the failure policy). Returns "pushed" or "pulled"."""
        ok, why = self.kv.wait_push(transfer_id, timeout_s)
        self.kv.drop_push(transfer_id)
        key = push_reservation_id(transfer_id)
        if ok:
            self.migrate_in_commit(key, dataclasses.replace(request, kv_transfer={"migrated_in": key}), num_tokens)
            release_at_source(SourceRef(source_id, source), transfer_id)
            return "pushed"
        log.warning("layer-wise push of %s incomplete (%s): pulling it instead", transfer_id, why)
        self.loop.call(lambda loop: self.kv.migrations.cancel(key), LOOP_CALL_TIMEOUT_S)
        self.add_transferred(request, source_id, source, num_tokens)
        return "pulled"

    def push_cancel(self, transfer_id: str) -> bool:
        """The request will not come (aborted, or its prefill failed): free the reservation."""
        self.kv.drop_push(transfer_id)
        key = push_reservation_id(transfer_id)
        return self.loop.call(lambda loop: self.kv.migrations.cancel(key), LOOP_CALL_TIMEOUT_S)

    def _free_refused(self, request: EngineRequest) -> None:
        """Loop thread: a migration's continuation arrived after its front end gave up on it
        (the engine refused it): the blocks reserved for it go back to the pool."""
        migration_id = (request.kv_transfer or {}).get("migrated_in")
        if migration_id:
            self._incoming.discard(migration_id)
            self.kv.migrations.cancel(migration_id)

    def snapshot(self, prefix_since: int | None = None) -> EngineSnapshot:
        """The engine's snapshot plus the live-migration state held here, which a restarted
        scheduler cleans up (its migrations died with the scheduler that ran them)."""
        horizon = time.monotonic() - max(600.0, 10 * self.transfer.hold_timeout_s)
        for migration_id in [m for m, rec in self._stopped.items() if rec["at"] < horizon]:
            del self._stopped[migration_id]  # nobody came for it: the front end replayed long ago
        stopped = {m: {"request": rec["request"], "target": rec["target"]} for m, rec in list(self._stopped.items())}
        return dataclasses.replace(super().snapshot(prefix_since), migrations={
            "incoming": sorted(self._incoming), "outgoing": sorted(self._outgoing), "stopped": stopped})

    def migration_state(self) -> dict:
        """Blocks reserved for incoming migrations and stage views held (tests, status)."""
        return {"reserved_blocks": self.kv.migrations.reserved_blocks(),
                "expired_reservations": self.kv.migrations.expired_reservations,
                "holds": self.kv.num_holds}
