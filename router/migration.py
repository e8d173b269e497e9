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
COMMITTING pulls that small tail and adds the request (prompt + every token so far, as the
source's reply gives it) on the destination, which adopts the reserved blocks and samples the
next token.

The coordinator runs in the global scheduler, which never carries tokens: the stream lives at
the request's front end. The source's "migrated" marker (after the request's last token there)
names the destination and the request's new engine-side id, so the front end switches its
stream to the destination by itself (holding back any destination delta that outruns the
marker): one stream, no token lost or repeated, whichever front end owns it. After the stop
there is no going back to the source: a commit that fails still runs the request on the
destination, recomputing its KV (or, if the destination died, the front end replays it). The
source keeps the continuation until the commit is confirmed, so a scheduler that died midway
is replaced by one that finishes the job (`finish_stopped`).

Modes, for the downtime benchmark: live (above), stop_copy (no stages: everything is copied
after the stop) and recompute (nothing is copied: the destination recomputes the sequence).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Protocol, runtime_checkable

from cluster.config import MigrationConfig
from cluster.kv.layout import blocks_for_tokens
from cluster.protocol import EngineRequest, LiveRequest, tail_transfer_id
from router.instances import InstanceState
from router.migration_types import MigrationRecord, MigrationState

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
    """What the coordinator needs from the component that places requests (the global
    scheduler): deadline-bound actor calls, whether a request still runs where it did, and the
    bookkeeping of a request that moved."""

    async def call_actor(self, ref):
        """Awaits an actor call's result under the scheduler's per-call deadline."""

    def fire(self, ref) -> None:
        """Sends an actor call whose result nobody waits for (still under a deadline)."""

    def request_left(self, req: LiveRequest, src) -> str | None:
        """Why `req` no longer runs on `src` under its engine-side id: "finished" or
        "replayed"; None while it still does (as far as the scheduler knows)."""

    def moved(self, rec: MigrationRecord, req: LiveRequest, src, dst, request: EngineRequest) -> None:
        """The request runs on `dst` as `request` from now on (dispatch counts it there)."""


def continuation_id(rec: MigrationRecord) -> str:
    """The request's engine-side id on the destination (unique per migration)."""
    return rec.migration_id


class MigrationCoordinator:
    """Runs migrations of requests placed by a MigrationHost."""

    def __init__(self, host: MigrationHost, config: MigrationConfig):
        self.host = host
        self.config = config

    async def run(self, rec: MigrationRecord, req: LiveRequest, src, dst, mode: str = "live") -> MigrationRecord:
        engine_id = req.request_id
        stopped = None
        try:
            stopped, staged = await self._precopy_and_stop(rec, req, src, dst, engine_id, mode)
            await self._commit(rec, req, src, dst, staged, stopped, mode)
        except MigrationAborted as exc:
            self._abort(rec, src, dst, exc.reason, stopped)
        except Exception as exc:  # noqa: BLE001 - a dead or hung actor, a transfer failure, a bug: abort cleanly
            key = "source_failed" if stopped is None and self._source_gone(req, src) else "destination_failed"
            self._abort(rec, src, dst, f"{key}: {type(exc).__name__}: {exc}", stopped)
        return rec

    # ---- before the stop: the request runs on the source throughout ----
    async def _precopy_and_stop(self, rec, req, src, dst, engine_id, mode):
        call = self.host.call_actor
        block_size = src.info.block_size
        staged, preemptions, last = 0, -1, None
        if mode == "live":
            advance(rec, MigrationState.PRECOPY)
            for stage in range(self.config.max_stages):
                self._check_source(req, src)
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
                        self.host.fire(src.actor.kv_release.remote(out["transfer_id"]))
                        raise
                    await call(dst.actor.migrate_in_pull.remote(
                        rec.migration_id, src.instance_id, src.actor, src.info.node_id, out["transfer_id"],
                        staged, out["num_blocks"], self.config.timeout_s))
                    staged = out["full_blocks"]
                    rec.blocks_copied += out["num_blocks"]
                else:
                    self.host.fire(src.actor.kv_release.remote(out["transfer_id"]))
                rec.stages += 1
                if out["num_blocks"] <= self.config.stop_copy_blocks:
                    break
            # Room for the tail too, before the request stops: the stop must not outrun memory.
            await self._reserve(dst, rec, blocks_for_tokens(last["num_computed_tokens"], block_size) + 1)
        elif mode == "stop_copy":
            advance(rec, MigrationState.STOPPING)
            self._check_source(req, src)
        elif mode != "recompute":
            raise ValueError(f"unknown migration mode {mode!r} (one of {MODES})")
        if rec.state != MigrationState.STOPPING:
            advance(rec, MigrationState.STOPPING)
        self._check_source(req, src)
        self._mark(rec)
        # The marker the source ends the stream with tells the front end where it continues.
        continuation = {"request_id": continuation_id(rec), "instance_id": dst.instance_id}
        out = await self._source_call(src, src.actor.migrate_out_stop.remote(
            engine_id, rec.migration_id, staged, preemptions, continuation))
        self._mark(rec, "stop")
        if out["status"] != "stopped":
            raise MigrationAborted(self._not_running(out["status"]))
        rec.tokens_moved = out["num_computed_tokens"] if mode != "recompute" else 0
        return out, staged

    # ---- after the stop: the request runs nowhere until the commit ----
    async def _commit(self, rec, req, src, dst, staged, stop, mode) -> None:
        call = self.host.call_actor
        advance(rec, MigrationState.COMMITTING)
        num_tokens = stop["num_computed_tokens"]
        if mode == "recompute":
            num_tokens = 0
            self.host.fire(src.actor.kv_release.remote(stop["transfer_id"]))
        else:
            await self._reserve(dst, rec, blocks_for_tokens(num_tokens, src.info.block_size))
            await call(dst.actor.migrate_in_pull.remote(
                rec.migration_id, src.instance_id, src.actor, src.info.node_id, stop["transfer_id"],
                staged, stop["num_blocks"], self.config.timeout_s))
            rec.blocks_copied += stop["num_blocks"]
        self._mark(rec, "tail")
        kv = {"migrated_in": rec.migration_id} if num_tokens else None
        request = dataclasses.replace(stop["request"], kv_transfer=kv)
        self.host.moved(rec, req, src, dst, request)
        if num_tokens:
            await call(dst.actor.migrate_in_commit.remote(rec.migration_id, request, num_tokens))
        else:
            await call(dst.actor.add_request.remote(request))
        self._mark(rec, "commit")
        rec.phases_s["_wall_commit"] = time.time()  # the front end's first token is timed against it
        advance(rec, MigrationState.COMMITTED)
        self.host.fire(src.actor.migrate_out_done.remote(rec.migration_id))

    async def _source_call(self, src, ref):
        """A call to the source before the request stopped there: its failure aborts the
        migration as the source's (if the source did stop the request and only the reply was
        lost, the scheduler finds the stopped request in the source's snapshot and finishes
        the move: `finish_stopped`)."""
        try:
            return await self.host.call_actor(ref)
        except Exception as exc:
            raise MigrationAborted(f"source_failed: {src.instance_id}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _mark(rec: MigrationRecord, phase: str | None = None) -> None:
        """Times the phases after the stop (the downtime's parts); None starts the clock."""
        now = time.monotonic()
        if phase is not None:
            rec.phases_s[phase] = now - rec.phases_s.get("_t", now)
        rec.phases_s["_t"] = now

    async def _reserve(self, dst, rec, total_blocks: int) -> None:
        out = await self.host.call_actor(dst.actor.migrate_in_reserve.remote(
            rec.migration_id, total_blocks, self.config.reserve_watermark_blocks))
        if out["status"] == "no_memory":
            raise MigrationAborted(f"destination_no_memory: {dst.instance_id} cannot spare {total_blocks} blocks")
        if out["status"] != "ok":
            raise MigrationAborted(f"unsupported: {out.get('reason', out['status'])}")

    # ---- ways out ----
    def _abort(self, rec, src, dst, reason: str, stopped: dict | None) -> None:
        log.warning("migration %s of %s (%s -> %s) aborted: %s", rec.migration_id, rec.request_id,
                    src.instance_id, dst.instance_id, reason)
        rec.reason = reason
        if rec.state != MigrationState.ABORTED:
            advance(rec, MigrationState.ABORTED)
        if dst.state != InstanceState.DEAD:
            self.host.fire(dst.actor.migrate_in_cancel.remote(rec.migration_id))
        if src.state != InstanceState.DEAD:
            self.host.fire(src.actor.migrate_out_cancel.remote(rec.migration_id))
        if stopped is None:
            return  # the request never stopped on the source: it simply stays there
        # Stopped on the source, and its front end already follows it to the destination: run
        # it there without the KV (recomputed), or, the destination being dead, let the front
        # end replay it.
        self.finish_stopped(rec.migration_id, stopped["request"], src, dst, cancel_reservation=False)

    def finish_stopped(self, migration_id: str, request: EngineRequest, src, dst,
                       cancel_reservation: bool = True) -> None:
        """A request stopped on `src` for a migration that will not commit: start it on `dst`
        (recompute; an engine runs an id once, so this is safe to repeat) and release what the
        source still holds for it."""
        if src.state != InstanceState.DEAD:
            self.host.fire(src.actor.kv_release.remote(tail_transfer_id(migration_id)))
            self.host.fire(src.actor.migrate_out_done.remote(migration_id))
        if dst is None or dst.state == InstanceState.DEAD:
            return
        if cancel_reservation:
            self.host.fire(dst.actor.migrate_in_cancel.remote(migration_id))
        self.host.fire(dst.actor.add_request.remote(dataclasses.replace(request, kv_transfer=None)))

    def _check_source(self, req, src) -> None:
        if src.state == InstanceState.DEAD:
            raise MigrationAborted(f"source_failed: {src.instance_id} died")
        left = self.host.request_left(req, src)
        if left == "finished":
            raise MigrationAborted("finished: the request finished on the source")
        if left is not None:
            raise MigrationAborted("source_failed: the request left the source (replayed)")

    def _source_gone(self, req, src) -> bool:
        return src.state == InstanceState.DEAD or self.host.request_left(req, src) is not None

    @staticmethod
    def _not_running(status: str) -> str:
        if status in ("gone", "finished"):
            return "finished: the request finished on the source"
        return f"preempted: the request was {status} on the source"
