"""DecodeWorker: a vLLM engine as KV consumer, and both ends of live migration.

A transferred request arrives as prompt + first token with `do_remote_prefill`; vLLM's
scheduler allocates its blocks and parks it while the agent pulls the prompt's KV from the
prefill worker, then computes only the first token's KV and decodes on with continuous
batching.

Live migration (the router's coordinator, router/migration.py, drives these steps):
- source: `migrate_out_stage` exposes the blocks filled since the last stage while the request
  keeps decoding; `migrate_out_stop` ends it here and holds the remaining blocks;
- destination: `migrate_in_reserve` pre-allocates blocks, `migrate_in_pull` copies a stage
  into them, `migrate_in_commit` adds the request, which adopts them; `migrate_in_cancel`
  (or the reservation deadline) frees them.
"""

from __future__ import annotations

from cluster.engine.worker import EngineWorker, KVWorkerMixin
from cluster.kv.layout import blocks_for_tokens
from cluster.kv.transports.base import SourceRef
from cluster.protocol import EngineRequest, stage_transfer_id, tail_transfer_id
from decode_worker import migration_adapter as ma
from decode_worker.speculation import TetrisMixin

# Longest a migration step waits for the engine loop (one step, normally milliseconds).
LOOP_CALL_TIMEOUT_S = 10.0


class DecodeWorker(TetrisMixin, KVWorkerMixin, EngineWorker):
    role = "decode"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        engine = self.loop.engine
        ledger = self.agent.migrations
        ledger.reservation_timeout_s = self.transfer.hold_timeout_s
        ledger.take_blocks = lambda n: ma.reserve_blocks(engine, n, self._keep_free)
        ledger.free_blocks = lambda blocks: ma.free_blocks(engine, blocks)
        ledger.adopt_blocks = lambda internal_id, blocks: ma.adopt_blocks(engine, internal_id, blocks)
        self.loop.housekeeping.append(ledger.expire)
        self._keep_free = 1
        self._migration_unsupported = ma.migration_supported(engine)

    def add_transferred(self, request: EngineRequest, source_id: str, source, num_tokens: int,
                        source_node: str | None = None) -> None:
        """Admit a request whose first `num_tokens` tokens' KV lives on `source` (an actor)."""
        transfer_id = request.kv_transfer["transfer_id"]
        self.agent.expect(transfer_id, SourceRef(source_id, source, source_node), num_tokens)
        try:
            self.loop.add(request)
        except Exception:
            self.agent.forget(transfer_id)
            raise

    def abort(self, request_ids: list[str]) -> None:
        self.loop.abort(request_ids)
        for request_id in request_ids:  # a load not started yet releases its source now
            self.agent.forget(request_id)

    # ---- migration, source side ----
    def migrate_out_stage(self, request_id: str, migration_id: str, stage: int, from_block: int) -> dict:
        """Exposes the request's full blocks from `from_block` on for one pull, while it keeps
        running. Returns its progress; status other than "ok" means: do not migrate."""

        def on_loop(loop):
            progress = self._progress(loop, request_id)
            if progress is None or progress.status != "running":
                return {"status": progress.status if progress else "gone"}
            full = progress.full_blocks(self.agent.block_size)
            blocks = list(progress.block_ids[from_block:full])
            transfer_id = stage_transfer_id(migration_id, stage)
            self.agent.hold_view(transfer_id, loop.internal_id(request_id), blocks, full * self.agent.block_size)
            return {"status": "ok", "transfer_id": transfer_id, "full_blocks": full,
                    "num_blocks": len(blocks), "num_computed_tokens": progress.num_computed_tokens,
                    "num_tokens": progress.num_tokens, "preemptions": progress.num_preemptions}

        out = self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)
        if out["status"] == "ok":
            self.agent.warm_exports(spare_segments=2)  # this stage's export and the tail's
        return out

    def migrate_out_stop(self, request_id: str, migration_id: str, from_block: int, preemptions: int) -> dict:
        """Stops the request here (its stream ends with finish reason "migrated", after every
        token it produced) and holds its blocks from `from_block` on for the destination.
        Refuses if it finished, or was preempted since the stages began (their blocks may have
        been reused): the request then simply keeps running here."""

        def on_loop(loop):
            progress = self._progress(loop, request_id)
            if progress is None or progress.status == "finished":
                return {"status": "gone"}
            # preemptions < 0: no stage ran (stop_copy / recompute), nothing staged can be stale.
            if progress.status != "running" or 0 <= preemptions != progress.num_preemptions:
                return {"status": "preempted"}
            transfer_id = tail_transfer_id(migration_id)
            self.agent.migrations.mark_stopping(loop.internal_id(request_id), transfer_id, from_block)
            loop.end_request(request_id, "migrated")
            tail = max(0, blocks_for_tokens(progress.num_computed_tokens, self.agent.block_size) - from_block)
            return {"status": "stopped", "transfer_id": transfer_id, "num_blocks": tail,
                    "num_computed_tokens": progress.num_computed_tokens, "num_tokens": progress.num_tokens}

        return self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)

    def migrate_out_cancel(self, migration_id: str) -> int:
        """Drops the stage views of an abandoned migration (the request keeps running)."""
        return self.agent.release_views(f"{migration_id}#")

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
            ids = self.agent.migrations.reserve(migration_id, total_blocks)
            return {"status": "no_memory"} if ids is None else {"status": "ok", "block_ids": ids}

        return self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)

    def migrate_in_pull(self, migration_id: str, source_id: str, source, source_node: str | None,
                        transfer_id: str, first_block: int, num_blocks: int, timeout_s: float) -> int:
        """Copies the source's hold `transfer_id` into reserved blocks [first_block,
        first_block + num_blocks). Runs beside the engine: nothing but us uses those blocks."""
        ids = self.agent.migrations.block_ids(migration_id)
        ref = SourceRef(source_id, source, source_node)
        if num_blocks == 0 or ids is None or first_block + num_blocks > len(ids):
            self.agent.release_source(ref, transfer_id)  # nothing to copy, or nowhere to put it
            if num_blocks == 0:
                return 0
            raise RuntimeError(f"migration {migration_id}: blocks {first_block}+{num_blocks} not reserved")
        return self.agent.pull(ref, transfer_id, ids[first_block:first_block + num_blocks], timeout_s)

    def migrate_in_commit(self, migration_id: str, request: EngineRequest, num_tokens: int) -> None:
        """Adds the request (prompt + every token so far); its first `num_tokens` tokens' KV is
        in the reservation, which it adopts when vLLM schedules it."""

        def on_loop(loop):
            self.agent.migrations.commit(migration_id, num_tokens, self.agent.block_size)

        self.loop.call(on_loop, LOOP_CALL_TIMEOUT_S)
        try:
            self.loop.add(request)
        except Exception:
            self.loop.call(lambda loop: self.agent.migrations.cancel(migration_id), LOOP_CALL_TIMEOUT_S)
            raise

    def migrate_in_cancel(self, migration_id: str) -> bool:
        return self.loop.call(lambda loop: self.agent.migrations.cancel(migration_id), LOOP_CALL_TIMEOUT_S)

    def migration_state(self) -> dict:
        """Blocks reserved for incoming migrations and stage views held (tests, status)."""
        return {"reserved_blocks": self.agent.migrations.reserved_blocks(),
                "expired_reservations": self.agent.migrations.expired_reservations,
                "holds": self.agent.num_holds}
