"""MigrationScheduler: the global scheduler's migration decisions — which request moves where
(admin Migrate, drain, Llumnix's periodic pairing by freeness), one migration per instance at a
time, and the bookkeeping around router/migration.py's coordinator, which runs each one.

It works on the scheduler's registry (router/instances.py `Instance`: load, the requests each
engine reported, placements not reported yet) and never sees a token. It also cleans up
migration state that no running migration owns — what a scheduler that died midway, or a lost
reply, left on the engines: reservations and stage views are cancelled, a request already
stopped on its source is started on its destination (`MigrationCoordinator.finish_stopped`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from cluster.config import MigrationConfig
from cluster.kv.layout import blocks_for_tokens
from cluster.protocol import EngineRequest, LiveRequest, client_request_id
from router.errors import RequestError
from router.freeness import (
    InstanceView,
    RequestView,
    available_blocks,
    is_high_priority,
    pair_migrations,
    pick_dispatch,
    select_request,
)
from router.instances import Instance, InstanceState, Pending
from router.metrics import RouterMetrics
from router.migration import MODES, MigrationCoordinator
from router.migration_types import DrainResult, MigrationRecord, MigrationState, MigrationStats

log = logging.getLogger(__name__)

# Seconds between two clean-ups of the same leftover (its cancel may still be on its way).
_CLEANUP_RETRY_S = 5.0


class MigrationScheduler:
    """`registry` is the scheduler: `instances` (id -> Instance), `call_actor`, `fire`,
    `view_changed(instance)` and `spawn(coro)`."""

    def __init__(self, registry, config: MigrationConfig, metrics: RouterMetrics | None = None,
                 tag: str = ""):
        self.registry = registry
        self.config = config
        self.freeness = config.freeness()
        self.metrics = metrics or RouterMetrics()
        self.coordinator = MigrationCoordinator(self, config)
        self.stats = MigrationStats()
        # Migrations in flight, by id; the client request ids they move.
        self._migrations: dict[str, MigrationRecord] = {}
        self._moving: dict[str, str] = {}  # client request id -> migration id
        self._started_at: dict[str, float] = {}  # engine-side id -> when its migration began
        self._resumed: dict[str, asyncio.Event] = {}
        self._backoff: dict[str, float] = {}  # client request id -> not before (monotonic)
        self._cleaned: dict[tuple[str, str], float] = {}  # (kind, migration id) -> when
        # Unique across scheduler restarts: a restarted scheduler must not reuse an id whose
        # leftovers (holds, reservations) may still exist on the engines.
        self._tag = tag
        self._seq = 0
        self._stopping = False

    @property
    def instances(self) -> dict[str, Instance]:
        return self.registry.instances

    # ---- MigrationHost ----
    async def call_actor(self, ref):
        return await self.registry.call_actor(ref)

    def fire(self, ref) -> None:
        self.registry.fire(ref)

    def request_left(self, req: LiveRequest, src: Instance) -> str | None:
        if req.request_id in src.requests or req.request_id in src.pending:
            return None
        started = self._started_at.get(req.request_id, 0.0)
        if src.reported_at <= started:
            return None  # no snapshot since the migration began: it is there as far as we know
        rid = client_request_id(req.request_id)
        for inst in self.instances.values():
            if any(client_request_id(e) == rid for e in (*inst.requests, *inst.pending)):
                return "replayed"
        return "finished"

    def moved(self, rec: MigrationRecord, req: LiveRequest, src: Instance, dst: Instance,
              request: EngineRequest) -> None:
        src.requests.pop(req.request_id, None)
        src.pending.pop(req.request_id, None)
        src.in_flight.discard(rec.request_id)
        src.requests_served += 1
        dst.place(Pending(request.request_id, rec.request_id, len(request.prompt_token_ids),
                          request.priority, request.owner))
        self.registry.view_changed(src)
        self.registry.view_changed(dst)

    # ---- finding requests ----
    def find(self, request_id: str) -> list[tuple[Instance, LiveRequest]]:
        """Where the client request `request_id` runs (usually one place). One engine-side id
        seen on two instances is one request: a prefill hands its id over to the decode
        instance, and the scheduler's record of the prefill may lag; the decode side wins,
        then a reported request over a mere placement."""
        by_engine_id: dict[str, tuple[tuple, Instance, LiveRequest]] = {}
        for inst in self.instances.values():
            if not inst.serving:
                continue
            rank_role = 0 if inst.role == "prefill" else 1
            for engine_id, live in inst.requests.items():
                if client_request_id(engine_id) == request_id:
                    self._keep(by_engine_id, engine_id, (rank_role, 1), inst, live)
            for engine_id, pending in inst.pending.items():
                if pending.request_id == request_id and engine_id not in inst.requests:
                    live = LiveRequest(engine_id, pending.owner, pending.num_tokens, 0, pending.priority, time.time())
                    self._keep(by_engine_id, engine_id, (rank_role, 0), inst, live)
        return [(inst, live) for _, inst, live in by_engine_id.values()]

    @staticmethod
    def _keep(found: dict, engine_id: str, rank: tuple, inst: Instance, live: LiveRequest) -> None:
        if engine_id not in found or rank > found[engine_id][0]:
            found[engine_id] = (rank, inst, live)

    # ---- views ----
    def high_priority_count(self, inst: Instance) -> int:
        return sum(1 for p in inst.priorities() if is_high_priority(p, self.freeness))

    def decode_view(self, i: Instance) -> InstanceView:
        """The freeness policy's view of a decode instance with a load report."""
        return InstanceView(
            instance_id=i.instance_id, num_total_blocks=i.load.num_total_blocks,
            num_free_blocks=min(i.load.num_free_blocks, i.load.num_total_blocks),
            num_running=max(i.load.num_running, len(i.in_flight)), num_waiting=i.load.num_waiting,
            head_waiting_blocks=i.load.head_waiting_blocks, draining=i.state == InstanceState.DRAINING,
            high_priority_running=self.high_priority_count(i), migrating=i.migrating is not None)

    def decode_views(self) -> list[InstanceView]:
        return [self.decode_view(i) for i in self.instances.values()
                if i.role == "decode" and i.serving and i.load is not None]

    # ---- migrate ----
    async def migrate(self, request_id: str, target: str | None = None, trigger: str = "admin",
                      mode: str = "live") -> MigrationRecord:
        """Moves a decoding request to decode instance `target` (None: the freest other one)
        while it keeps running. Returns the finished record (committed or aborted)."""
        if mode not in MODES:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown migration mode {mode!r}")
        found = self.find(request_id)
        if not found:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no in-flight request with id {request_id!r}")
        if len(found) > 1:
            where = ", ".join(sorted(f"{i.instance_id} ({r.owner or 'no front end'})" for i, r in found))
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"request id {request_id!r} is in flight more than once ({where}); "
                               "migrate needs a unique id")
        src, req = found[0]
        if src.role != "decode":
            phase = "prefill" if src.role == "prefill" else "single"
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"request {request_id!r} is not decoding on a decode instance (phase "
                               f"{phase}); only decode instances migrate requests")
        if request_id in self._moving:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"request {request_id!r} is already migrating ({self._moving[request_id]})")
        dst = self._target(request_id, req, src, target)
        for inst in (src, dst):
            if inst.migrating is not None:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"instance {inst.instance_id} is already in migration {inst.migrating} "
                                   "(one at a time per instance)")
        self._seq += 1
        rec = MigrationRecord(f"{req.request_id}~m{self._tag}{self._seq}", request_id,
                              src.instance_id, dst.instance_id, trigger=trigger)
        src.migrating = dst.migrating = rec.migration_id
        self._migrations[rec.migration_id] = rec
        self._moving[request_id] = rec.migration_id
        self._started_at[req.request_id] = time.monotonic()
        resumed = self._resumed[rec.migration_id] = asyncio.Event()
        self.stats.started += 1
        self.registry.view_changed(src)
        self.registry.view_changed(dst)
        try:
            await self.coordinator.run(rec, req, src, dst, mode)
        finally:
            src.migrating = dst.migrating = None
            self._moving.pop(request_id, None)
            self._started_at.pop(req.request_id, None)
            self.registry.view_changed(src)
            self.registry.view_changed(dst)
        if rec.state == MigrationState.COMMITTED:
            # The caller gets the downtime too: its front end reports the destination's first token.
            try:
                await asyncio.wait_for(resumed.wait(), self.config.timeout_s)
            except asyncio.TimeoutError:
                pass
        self._finished(rec)
        return rec

    def _target(self, request_id: str, req: LiveRequest, src: Instance, target: str | None) -> Instance:
        if target:
            dst = self.instances.get(target)
            if dst is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"no instance {target!r}")
            if dst.role != "decode" or not dst.ready:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"instance {target!r} is not a ready decode instance "
                                   f"({dst.role}, {dst.state.value})")
            if dst is src:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"request {request_id!r} already runs on {target!r}")
            return dst
        needed = blocks_for_tokens(req.num_prompt_tokens + req.num_output_tokens + 1, src.info.block_size)
        views = [v for v in self.decode_views() if v.instance_id != src.instance_id]
        # Prefer an instance free to take it now; else name the busy one (refused just after).
        chosen = (pick_dispatch([v for v in views if not v.migrating], self.freeness, needed, req.priority)
                  or pick_dispatch(views, self.freeness, needed, req.priority))
        if chosen is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"no other decode instance has room for request {request_id!r}")
        return self.instances[chosen]

    def resumed(self, migration_id: str, downtime_s: float, first_token_wall: float) -> bool:
        """The request's front end saw the destination's first token (the migration's
        downtime, measured where the client's stream is)."""
        rec = self._migrations.get(migration_id)
        if rec is None:
            return False
        rec.downtime_s = downtime_s
        commit_wall = rec.phases_s.get("_wall_commit")
        if commit_wall is not None:
            rec.phases_s["first_token"] = max(0.0, first_token_wall - commit_wall)
        event = self._resumed.get(migration_id)
        if event is not None:
            event.set()
        return True

    def _finished(self, rec: MigrationRecord) -> None:
        if self._migrations.pop(rec.migration_id, None) is None:
            return
        self._resumed.pop(rec.migration_id, None)
        for key in ("_t", "_wall_commit"):
            rec.phases_s.pop(key, None)
        self.stats.record(rec)
        self.metrics.observe_migration(rec)

    def snapshot(self) -> dict:
        in_flight = [r for r in self._migrations.values() if not r.state.done]
        return self.stats.snapshot(in_flight)

    migration_snapshot = snapshot  # what RouterMetrics.watch reads for the in-flight gauge

    # ---- drain ----
    async def drain(self, instance_id: str, timeout_s: float | None = None) -> DrainResult:
        """Sends nothing new to the instance and moves its running requests to other decode
        instances (prefill and colocated instances just finish theirs); returns when it is
        empty or the deadline passed. It stays draining until undrain()."""
        inst = self.instances.get(instance_id)
        if inst is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no instance {instance_id!r}")
        if not inst.serving:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"instance {instance_id!r} is {inst.state.value}, not serving")
        inst.state = InstanceState.DRAINING
        self.registry.view_changed(inst)
        result = DrainResult(instance_id)
        deadline = time.monotonic() + (timeout_s or self.config.drain_timeout_s)
        while inst.in_flight and time.monotonic() < deadline and inst.state == InstanceState.DRAINING:
            moved = False
            if inst.role == "decode":
                for request_id in sorted(inst.in_flight):
                    if request_id in self._moving:
                        continue
                    try:
                        rec = await self.migrate(request_id, None, trigger="drain")
                    except RequestError:
                        continue  # finished meanwhile, or nowhere to go yet: next round
                    result.migrations.append(rec)
                    if rec.state == MigrationState.COMMITTED:
                        result.migrated += 1
                        moved = True
                    else:
                        result.failed += 1
            if not moved:
                await asyncio.sleep(0.05)
        result.remaining = len(inst.in_flight)
        return result

    def undrain(self, instance_id: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no instance {instance_id!r}")
        if inst.state != InstanceState.DRAINING:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"instance {instance_id!r} is {inst.state.value}, not draining")
        inst.state = InstanceState.READY
        self.registry.view_changed(inst)

    # ---- Llumnix's periodic pairing ----
    async def balance_loop(self) -> None:
        """Every interval the most loaded decode instances give a request each to the freest
        ones (thresholds and selection policy in MigrationConfig)."""
        while not self._stopping:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.balance_once()
            except Exception:
                log.exception("migration pairing round failed")

    def balance_once(self) -> list[tuple[str, str, str]]:
        """One pairing round; starts the chosen migrations. Returns (request, source, target)."""
        views = {v.instance_id: v for v in self.decode_views()}
        started = []
        now, wall = time.monotonic(), time.time()
        for src_id, dst_id in pair_migrations(list(views.values()), self.freeness):
            src = self.instances[src_id]
            candidates = []
            for engine_id, live in src.requests.items():
                request_id = client_request_id(engine_id)
                if request_id in self._moving or self._backoff.get(request_id, 0.0) > now:
                    continue
                num_tokens = live.num_prompt_tokens + live.num_output_tokens
                num_blocks = blocks_for_tokens(num_tokens + 1, src.info.block_size)
                candidates.append(RequestView(request_id, src_id, num_blocks, num_tokens, live.priority,
                                              max(0.0, wall - live.arrival)))
            chosen = select_request(candidates, self.freeness, available_blocks(views[dst_id], self.freeness),
                                    source_draining=views[src_id].draining)
            if chosen is None:
                continue
            started.append((chosen.request_id, src_id, dst_id))
            self.registry.spawn(self.migrate_quietly(chosen.request_id, dst_id, "balance"))
        return started

    async def migrate_quietly(self, request_id: str, target: str, trigger: str) -> None:
        try:
            rec = await self.migrate(request_id, target, trigger=trigger)
            if rec.state == MigrationState.ABORTED:
                # E.g. preempted on the source (no KV to move until it runs again) or no room:
                # let a few pairing rounds pass before choosing it again.
                self._backoff[request_id] = time.monotonic() + 5 * self.config.interval_s
        except RequestError as exc:  # it finished, or the pair changed since the round
            log.debug("%s migration of %s skipped: %s", trigger, request_id, exc.message)
        now = time.monotonic()
        for rid in [r for r, until in self._backoff.items() if until < now]:
            del self._backoff[rid]

    # ---- leftovers no running migration owns ----
    def clean_up(self, inst: Instance, state: dict) -> None:
        """`state` is an engine snapshot's `migrations`: cancel reservations and stage views of
        migrations not in flight here, and finish the moves of requests stopped for them."""
        if not state:
            return
        now = time.monotonic()
        for key in [k for k, at in self._cleaned.items() if now - at > 10 * _CLEANUP_RETRY_S]:
            del self._cleaned[key]
        for kind in ("incoming", "outgoing"):
            for migration_id in state.get(kind, ()):
                if migration_id in self._migrations or not self._due((kind, migration_id), now):
                    continue
                log.warning("%s: cancelling %s migration %s that no migration in flight owns",
                            inst.instance_id, kind, migration_id)
                method = inst.actor.migrate_in_cancel if kind == "incoming" else inst.actor.migrate_out_cancel
                self.fire(method.remote(migration_id))
        for migration_id, stopped in (state.get("stopped") or {}).items():
            if migration_id in self._migrations or not self._due(("stopped", migration_id), now):
                continue
            request: EngineRequest = stopped["request"]
            dst = self.instances.get(stopped["target"])
            log.warning("%s: request %s was stopped for migration %s, which did not commit; starting "
                        "it on %s", inst.instance_id, request.request_id, migration_id, stopped["target"])
            if dst is not None and dst.state != InstanceState.DEAD:
                dst.place(Pending(request.request_id, client_request_id(request.request_id),
                                  len(request.prompt_token_ids), request.priority, request.owner))
            self.coordinator.finish_stopped(migration_id, request, inst, dst)

    def _due(self, key: tuple[str, str], now: float) -> bool:
        last = self._cleaned.get(key)
        if last is not None and now - last < _CLEANUP_RETRY_S:
            return False
        self._cleaned[key] = now
        return True

    def stop(self) -> None:
        self._stopping = True
