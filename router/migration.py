"""Live migration of one running request between decode instances (Llumnix's protocol on our
KV connector and vLLM's block manager). The workers expose the primitive steps
(decode_worker/worker.py); this module owns the order, the states and every way out.

    RESERVING -> PRECOPY -> STOPPING -> COMMITTING -> COMMITTED
        any state before the stop -> ABORTED: the request keeps running on the source
        COMMITTING fails            -> ABORTED: the router replays the request (source stopped)

PRECOPY: each stage exposes the source's full blocks filled since the last stage, the
destination grows its reservation and pulls them while the request keeps decoding. When a
stage found little new (`stop_copy_blocks`) or after `max_stages`, STOPPING ends the request on
the source (its stream ends with "migrated" after its last token) and holds the rest;
COMMITTING pulls that small tail and adds the request (prompt + every token so far) on the
destination, which adopts the reserved blocks and samples the next token. The router then
takes that engine's deltas for the request: one stream, no gap token lost or repeated.

Modes, for the downtime benchmark: live (above), stop_copy (no stages: everything is copied
after the stop) and recompute (nothing is copied: the destination recomputes the sequence).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, runtime_checkable

from cluster.config import MigrationConfig
from cluster.kv.layout import blocks_for_tokens
from cluster.protocol import EngineRequest, Sampling, TokenDelta, tail_transfer_id
from router.instances import InstanceState
from router.migration_types import MigrationRecord, MigrationState
from router.request_table import RequestState, RequestTable

log = logging.getLogger(__name__)

MODES = ("live", "stop_copy", "recompute")

_NEXT = {
    MigrationState.RESERVING: {MigrationState.PRECOPY, MigrationState.STOPPING, MigrationState.ABORTED},
    MigrationState.PRECOPY: {MigrationState.STOPPING, MigrationState.ABORTED},
    MigrationState.STOPPING: {MigrationState.COMMITTING, MigrationState.ABORTED},
    MigrationState.COMMITTING: {MigrationState.COMMITTED, MigrationState.ABORTED},
    MigrationState.COMMITTED: set(),
    MigrationState.ABORTED: set(),
}


class MigrationAborted(Exception):
    """`reason` starts with a short key (counted in status), then details after a colon."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def advance(rec: MigrationRecord, new: MigrationState) -> None:
    if new not in _NEXT[rec.state]:
        raise RuntimeError(f"migration {rec.migration_id}: illegal transition {rec.state.value} -> {new.value}")
    rec.state = new
    if new.done:
        rec.finished_at = time.monotonic()


@runtime_checkable
class MigrationHost(Protocol):
    """What the coordinator needs from the component that owns the requests' streams (the
    Router): their table, deadline-bound actor calls, and how a request resumes elsewhere."""

    table: RequestTable

    async def call_actor(self, ref):
        """Awaits an actor call's result under the router's per-call deadline."""

    def fire(self, ref) -> None:
        """Sends an actor call whose result nobody waits for (still under a deadline)."""

    def remaining(self, state: RequestState) -> tuple[tuple[int, ...], Sampling]:
        """Prompt + tokens streamed so far, and the sampling budget left."""

    def next_attempt(self, state: RequestState) -> str:
        """A fresh engine-side id for the request's next attempt (replay, migration commit)."""


class MigrationCoordinator:
    """Runs migrations for the requests of a MigrationHost."""

    def __init__(self, router: MigrationHost, config: MigrationConfig):
        self.router = router
        self.config = config

    async def run(self, rec: MigrationRecord, state, src, dst, mode: str = "live") -> MigrationRecord:
        engine_id = state.engine_request_id
        stopped = False
        try:
            stopped_info, staged = await self._precopy_and_stop(rec, state, src, dst, engine_id, mode)
            stopped = True
            await self._commit(rec, state, src, dst, engine_id, staged, stopped_info, mode)
        except MigrationAborted as exc:
            self._abort(rec, state, src, dst, engine_id, exc.reason, stopped)
        except Exception as exc:  # noqa: BLE001 - a dead or hung actor, a transfer failure, a bug: abort cleanly
            key = "source_failed" if not stopped and self._source_gone(state, src, engine_id) else (
                "destination_failed")
            self._abort(rec, state, src, dst, engine_id, f"{key}: {type(exc).__name__}: {exc}", stopped)
        return rec

    # ---- before the stop: the request runs on the source throughout ----
    async def _precopy_and_stop(self, rec, state, src, dst, engine_id, mode):
        call = self.router.call_actor
        block_size = src.info.block_size
        staged, preemptions, last = 0, -1, None
        if mode == "live":
            advance(rec, MigrationState.PRECOPY)
            for stage in range(self.config.max_stages):
                self._check_source(state, src, engine_id)
                out = await self._source_call(src, src.actor.migrate_out_stage.remote(
                    engine_id, rec.migration_id, stage, staged))
                if out["status"] != "ok":
                    raise MigrationAborted(self._not_running(out["status"]))
                if preemptions < 0:
                    preemptions = out["preemptions"]
                last = out
                if out["num_blocks"]:
                    try:
                        await self._reserve(dst, rec, out["full_blocks"])
                    except MigrationAborted:
                        self.router.fire(src.actor.kv_release.remote(out["transfer_id"]))
                        raise
                    await call(dst.actor.migrate_in_pull.remote(
                        rec.migration_id, src.instance_id, src.actor, src.info.node_id, out["transfer_id"],
                        staged, out["num_blocks"], self.config.timeout_s))
                    staged = out["full_blocks"]
                    rec.blocks_copied += out["num_blocks"]
                else:
                    self.router.fire(src.actor.kv_release.remote(out["transfer_id"]))
                rec.stages += 1
                if out["num_blocks"] <= self.config.stop_copy_blocks:
                    break
            # Room for the tail too, before the request stops: the stop must not outrun memory.
            await self._reserve(dst, rec, blocks_for_tokens(last["num_computed_tokens"], block_size) + 1)
        elif mode == "stop_copy":
            advance(rec, MigrationState.STOPPING)
            self._check_source(state, src, engine_id)
        elif mode != "recompute":
            raise ValueError(f"unknown migration mode {mode!r} (one of {MODES})")
        if rec.state != MigrationState.STOPPING:
            advance(rec, MigrationState.STOPPING)
        self._check_source(state, src, engine_id)
        state.migration_stopped.clear()
        self._mark(rec)
        out = await self._source_call(src, src.actor.migrate_out_stop.remote(
            engine_id, rec.migration_id, staged, preemptions))
        self._mark(rec, "stop")
        if out["status"] != "stopped":
            raise MigrationAborted(self._not_running(out["status"]))
        rec.tokens_moved = out["num_computed_tokens"] if mode != "recompute" else 0
        return out, staged

    # ---- after the stop: the request runs nowhere until the commit ----
    async def _commit(self, rec, state, src, dst, engine_id, staged, stop, mode) -> None:
        call = self.router.call_actor
        # Every token the source produced reached the stream before its "migrated" delta.
        await self._wait_stream_caught_up(state, engine_id)
        self._mark(rec, "catch_up")
        advance(rec, MigrationState.COMMITTING)
        num_tokens = stop["num_computed_tokens"]
        if mode == "recompute":
            num_tokens = 0
            self.router.fire(src.actor.kv_release.remote(stop["transfer_id"]))
        else:
            await self._reserve(dst, rec, blocks_for_tokens(num_tokens, src.info.block_size))
            await call(dst.actor.migrate_in_pull.remote(
                rec.migration_id, src.instance_id, src.actor, src.info.node_id, stop["transfer_id"],
                staged, stop["num_blocks"], self.config.timeout_s))
            rec.blocks_copied += stop["num_blocks"]
        self._mark(rec, "tail")
        if self.router.table.get(state.request_id) is not state or state.finished:
            raise MigrationAborted("client_gone: the request ended while it moved")
        if state.engine_request_id != engine_id or state.instance_id != src.instance_id:
            raise MigrationAborted("source_failed: the request was replayed while it moved")
        prompt, sampling = self.router.remaining(state)
        new_id = self.router.next_attempt(state)
        kv = {"migrated_in": rec.migration_id} if num_tokens else None
        request = EngineRequest(new_id, prompt, sampling, state.request.priority, kv_transfer=kv)
        # Switch the stream to the destination before it can produce anything.
        src.in_flight.discard(state.request_id)
        src.requests_served += 1
        state.instance_id = dst.instance_id
        dst.in_flight.add(state.request_id)
        state.resumed_migration = rec
        if num_tokens:
            await call(dst.actor.migrate_in_commit.remote(rec.migration_id, request, num_tokens))
        else:
            await call(dst.actor.add_request.remote(request))
        self._mark(rec, "commit")
        state.served_by.append(dst.instance_id)
        advance(rec, MigrationState.COMMITTED)

    async def _source_call(self, src, ref):
        """A call to the source before the request stopped there: its failure aborts the
        migration as the source's (if the source did stop the request and only the reply was
        lost, its "migrated" marker finds no migration and the router replays the request)."""
        try:
            return await self.router.call_actor(ref)
        except Exception as exc:
            raise MigrationAborted(f"source_failed: {src.instance_id}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _mark(rec: MigrationRecord, phase: str | None = None) -> None:
        """Times the phases after the stop (the downtime's parts); None starts the clock."""
        now = time.monotonic()
        if phase is not None:
            rec.phases_s[phase] = now - rec.phases_s.get("_t", now)
        rec.phases_s["_t"] = now

    async def _wait_stream_caught_up(self, state, engine_id: str) -> None:
        deadline = time.monotonic() + self.config.timeout_s
        while not state.migration_stopped.is_set():
            if state.engine_request_id != engine_id:
                raise MigrationAborted("source_failed: the request was replayed while it stopped")
            if state.finished:
                raise MigrationAborted("finished: a stop string ended the request as it stopped")
            if time.monotonic() > deadline:
                raise MigrationAborted("timeout: the source's last tokens never arrived")
            try:
                await asyncio.wait_for(state.migration_stopped.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    async def _reserve(self, dst, rec, total_blocks: int) -> None:
        out = await self.router.call_actor(dst.actor.migrate_in_reserve.remote(
            rec.migration_id, total_blocks, self.config.reserve_watermark_blocks))
        if out["status"] == "no_memory":
            raise MigrationAborted(f"destination_no_memory: {dst.instance_id} cannot spare {total_blocks} blocks")
        if out["status"] != "ok":
            raise MigrationAborted(f"unsupported: {out.get('reason', out['status'])}")

    # ---- ways out ----
    def _abort(self, rec, state, src, dst, engine_id, reason: str, stopped: bool) -> None:
        log.warning("migration %s of %s (%s -> %s) aborted: %s", rec.migration_id, rec.request_id,
                    src.instance_id, dst.instance_id, reason)
        rec.reason = reason
        if rec.state != MigrationState.ABORTED:
            advance(rec, MigrationState.ABORTED)
        if dst.state != InstanceState.DEAD:
            self.router.fire(dst.actor.migrate_in_cancel.remote(rec.migration_id))
        if src.state != InstanceState.DEAD:
            self.router.fire(src.actor.migrate_out_cancel.remote(rec.migration_id))
        state.resumed_migration = None
        if not stopped:
            return  # the request never stopped on the source: it simply stays there
        if src.state != InstanceState.DEAD:
            self.router.fire(src.actor.kv_release.remote(tail_transfer_id(rec.migration_id)))
        if self.router.table.get(state.request_id) is not state or state.finished:
            return
        if state.engine_request_id != engine_id and state.instance_id != dst.instance_id:
            return  # the router already replayed it (its source died): that attempt is not ours
        if state.instance_id == dst.instance_id and state.engine_request_id != engine_id:
            self.router.fire(dst.actor.abort.remote([state.engine_request_id]))
        # Stopped on the source, not running on the destination: replay what is left of it.
        state.deltas.put_nowait(TokenDelta(state.engine_request_id, [], True, "dead",
                                           error=f"migration {rec.migration_id} failed after the stop: {reason}"))

    @staticmethod
    def _check_source(state, src, engine_id: str) -> None:
        if state.finished:
            raise MigrationAborted("finished: the request finished on the source")
        if state.engine_request_id != engine_id or state.instance_id != src.instance_id:
            raise MigrationAborted("source_failed: the request left the source (replayed)")
        if src.state == InstanceState.DEAD:
            raise MigrationAborted(f"source_failed: {src.instance_id} died")

    @staticmethod
    def _source_gone(state, src, engine_id: str) -> bool:
        return src.state == InstanceState.DEAD or state.engine_request_id != engine_id

    @staticmethod
    def _not_running(status: str) -> str:
        if status in ("gone", "finished"):
            return "finished: the request finished on the source"
        return f"preempted: the request was {status} on the source"
