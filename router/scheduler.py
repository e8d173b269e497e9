"""GlobalScheduler: the one component of a deployment that decides — instance registry and
pool membership, every engine's load, where each request goes (`place`), live migration
(router/migration_scheduler.py), drain, and respawning dead engines. It never carries a token:
front ends (router/frontend.py) stream straight from the engines.

It runs as a named, detached Ray actor that Ray restarts when it dies. It keeps nothing it
cannot get back: on (re)start it finds the deployment's engines by name, reads each one's
snapshot (load, live requests with their owning front ends, migration state) and carries on;
leftovers of migrations that died with the previous incarnation are cleaned up from those
snapshots. Front ends re-register with their next heartbeat. Counters that must survive a
restart (its own restarts, each instance's restarts, pool membership) live in a small store
(Ray's internal KV in a deployment).

It is plain asyncio: no Ray import. Engines are reached through their actor handles, and made
or found through an `EngineSpawner` supplied by whoever wires the deployment (the role ->
worker class mapping lives there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from cluster.config import ServeConfig
from cluster.kv.layout import blocks_for_tokens
from cluster.protocol import EngineSnapshot, InstanceInfo
from router.dispatch_index import DispatchIndex
from router.dispatcher import Candidate, fewest_queued_prompt_tokens, freest, least_loaded
from router.errors import RequestError
from router.freeness import pick_dispatch
from router.instances import Instance, InstanceState, Pending
from router.metrics import RouterMetrics, migration_metrics_text
from router.migration_scheduler import MigrationScheduler
from router.prefix_index import PrefixIndex, RouteCandidate, RouteConfig, choose
from router.scaling import ScalingLoop
from router.sessions import SessionTable
from router.tasks import fire, spawn_tracked

log = logging.getLogger(__name__)

ROLES = ("colocated", "prefill", "decode")


class EngineSpawner(Protocol):
    """Makes and finds the deployment's engine actors (cluster/entrypoints/spawner.py)."""

    def spawn(self, role: str, instance_id: str):
        """A new engine actor of `role` named for `instance_id` (returns at once)."""

    def find(self, instance_id: str):
        """The running engine actor named for `instance_id`, or None."""

    def running_instances(self) -> list[str]:
        """Instance ids of every engine actor of the deployment that exists now."""

    def kill(self, actor) -> None:
        """Ends an engine actor for good (no restart)."""


class StateStore(Protocol):
    """A few small values that outlive the scheduler (Ray's internal KV in a deployment)."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...


class MemoryStore:
    """A StateStore that lives as long as the process (tests, in-process benchmarks)."""

    def __init__(self):
        self.values: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    def put(self, key: str, value: str) -> None:
        self.values[key] = value


@dataclass
class FrontEndEntry:
    """A front end as its heartbeats describe it."""

    frontend_id: str
    info: dict
    last_seen: float = field(default_factory=time.monotonic)
    stats: dict = field(default_factory=dict)


def error_reply(exc: RequestError) -> dict:
    """A RequestError as a plain value for a caller in another process (exceptions with
    gRPC codes do not survive Ray's serialization well): RequestError.from_reply turns it back."""
    return {"error": {"code": exc.code.name, "message": exc.message}}


def raise_if_error(reply):
    if isinstance(reply, dict) and "error" in reply:
        err = reply["error"]
        raise RequestError(grpc.StatusCode[err["code"]], err["message"])
    return reply


class GlobalScheduler:
    def __init__(self, config: ServeConfig, spawner: EngineSpawner, store: StateStore | None = None,
                 autostart: bool = True):
        self.config = config
        self.rc = config.router
        self.dc = config.deployment
        self.spawner = spawner
        self.store = store or MemoryStore()
        self.instances: dict[str, Instance] = {}
        self.frontends: dict[str, FrontEndEntry] = {}
        self._load_frontends()  # before any heartbeat can register one (and save the registry)
        self.metrics = RouterMetrics()
        self.started_at = time.time()
        self.incarnation = 0
        self.view_version = 0
        tag = secrets.token_hex(2)
        self.migration = MigrationScheduler(self, config.migration, self.metrics, tag=tag + ".")
        self.index = DispatchIndex(self.migration.freeness)
        # Prefix reuse: which prefill / colocated instance caches which prompt prefix (fed by the
        # engines' snapshots), and where each conversation's last turn ran.
        self.prefixes = PrefixIndex()
        self.sessions = SessionTable(config.prefix_routing.max_sessions)
        self.metrics.watch(self.migration)  # migrations in flight (re-exported by the front ends)
        # role -> ready instance ids, and those of them without a load report yet (view_changed).
        self._ready_ids: dict[str, set[str]] = {}
        self._unloaded_ids: dict[str, set[str]] = {}
        # role -> every instance id of it that has been seen by view_changed (the hand-off's lookup).
        self._role_members: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watchers: dict[str, asyncio.Task] = {}
        self._stopping = False
        self._ready = asyncio.Event() if _has_loop() else None
        self._start_task = None
        self.scaling: ScalingLoop | None = None
        # Until start() has rebuilt the view, nothing is answered from an empty one (a front end
        # would drop every engine from its own view).
        self.started = False
        if autostart and _has_loop():  # a Ray async actor: start at once (and again after a restart)
            self._start_task = asyncio.get_running_loop().create_task(self.start())

    # ---- lifecycle ----
    async def start(self) -> None:
        """Finds or starts every engine of the deployment and begins watching them."""
        if self._ready is None:
            self._ready = asyncio.Event()
        self.incarnation = int(self.store.get("scheduler_starts") or 0) + 1
        self.store.put("scheduler_starts", str(self.incarnation))
        saved_members = self.store.get("members") is not None
        members = self._members()
        found = await asyncio.to_thread(self.spawner.running_instances)
        for iid in found:
            if iid not in members:
                members[iid] = _role_of(iid)  # scaled out before a restart: the engines are the truth
        restarts = json.loads(self.store.get("restarts") or "{}")
        adopt = []
        for iid, role in sorted(members.items()):
            actor = await asyncio.to_thread(self.spawner.find, iid) if iid in found else None
            inst = Instance(info=_placeholder(iid, role, self.config.engine.model), actor=actor,
                            state=InstanceState.STARTING, restarts=int(restarts.get(iid, 0)))
            self.instances[iid] = inst
            if actor is not None:
                adopt.append(inst)
            else:
                if saved_members:  # it ran before and is gone: its replacement is a new incarnation
                    inst.restarts += 1
                inst.actor = self.spawner.spawn(role, iid)
        self._save_members()
        self._save_restarts()
        if self.incarnation > 1:
            log.warning("scheduler restarted (start %d): adopting %d running engine(s), starting %d",
                        self.incarnation, len(adopt), len(self.instances) - len(adopt))
        for inst in self.instances.values():
            self._spawn(self._bring_up(inst, adopted=inst in adopt))
        if self.config.migration.enabled:
            self._spawn(self.migration.balance_loop())
        if self.config.autoscaler.enabled:  # pool membership is the scheduler's: so is scaling
            self.scaling = ScalingLoop.from_config(self, self.config.autoscaler, registry=self.metrics.registry,
                                                   freeness_config=self.migration.freeness)
            self._spawn(self.scaling.run())
        self._spawn(self._frontend_reaper())
        self.started = True
        self._ready.set()

    async def wait_started(self, timeout_s: float = 60.0) -> int:
        """Waits until start() ran (a Ray caller's first call); returns this incarnation."""
        if self._ready is None:
            self._ready = asyncio.Event()
        await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self.incarnation

    async def stop(self) -> None:
        self._stopping = True
        self.migration.stop()
        if self.scaling is not None:
            await self.scaling.stop()
        tasks = list(self._tasks) + list(self._watchers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def shutdown_deployment(self) -> list[str]:
        """Stops every engine for good (`disagg-serve down`, a local `up` exiting)."""
        await self.stop()

        async def one(inst: Instance):
            if inst.actor is None:
                return
            try:
                await asyncio.wait_for(inst.actor.shutdown.remote(), 10.0)
            except Exception as exc:  # noqa: BLE001 - dead or hung: killing it is enough
                log.debug("clean shutdown of %s failed: %s", inst.instance_id, exc)
            await asyncio.to_thread(self.spawner.kill, inst.actor)

        await asyncio.gather(*(one(i) for i in self.instances.values()))
        return sorted(self.instances)

    def _members(self) -> dict[str, str]:
        saved = self.store.get("members")
        if saved:
            return dict(json.loads(saved))
        return {f"{p.role}-{i}": p.role for p in self.config.pools for i in range(p.num_instances)}

    def _save_members(self) -> None:
        self.store.put("members", json.dumps(sorted((i.instance_id, i.role) for i in self.instances.values())))

    def _save_restarts(self) -> None:
        self.store.put("restarts", json.dumps({i.instance_id: i.restarts for i in self.instances.values()}))

    # ---- instances ----
    async def _bring_up(self, inst: Instance, adopted: bool) -> None:
        """Waits for the engine to answer (model load) and starts watching it."""
        timeout = self.rc.actor_call_timeout_s if adopted else self.rc.startup_timeout_s
        try:
            info = await asyncio.wait_for(inst.actor.info.remote(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - it failed to start, or an adopted one is gone
            self._mark_dead(inst, f"{'adopted engine did not answer' if adopted else 'start failed'}: "
                                  f"{type(exc).__name__}: {exc}")
            return
        inst.info = info
        inst.state = InstanceState.READY
        self._changed(inst)
        log.info("%s %s ready (pid %d)", "adopted" if adopted else "started", inst.instance_id, info.pid)
        self._watchers[inst.instance_id] = self._spawn(self._watch(inst, inst.actor))

    async def _watch(self, inst: Instance, actor) -> None:
        """Reads the engine's snapshot every load interval; a failed read means it is gone."""
        while not self._stopping and inst.actor is actor and inst.state != InstanceState.DEAD:
            issued = time.monotonic()
            since = self.prefixes.position(inst.instance_id)
            # An engine that reports prefixes gets its journal position back (a delta comes).
            ref = actor.snapshot.remote() if since is None else actor.snapshot.remote(since)
            try:
                snap: EngineSnapshot = await asyncio.wait_for(ref, self.rc.actor_call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a read that fails in any way means the engine is gone
                if inst.actor is actor:
                    self._mark_dead(inst, f"snapshot failed: {type(exc).__name__}: {exc}")
                return
            if inst.actor is not actor:
                return
            inst.observe(snap.load, snap.requests, now=issued)
            self.prefixes.apply(inst.instance_id, getattr(snap, "prefix", None))
            self.view_changed(inst)
            if snap.fatal_error:
                self._mark_dead(inst, snap.fatal_error)
                return
            if inst.role == "decode":
                self.migration.clean_up(inst, snap.migrations)
            await asyncio.sleep(self.dc.load_interval_s)

    def report_dead(self, instance_id: str, restarts: int, reason: str) -> bool:
        """A front end's poll of the engine failed. Trusted only for the incarnation it saw; the
        scheduler's own next read confirms or refutes it within a load interval."""
        inst = self.instances.get(instance_id)
        if inst is None or inst.restarts != restarts or inst.state == InstanceState.DEAD:
            return False
        log.warning("front end reports %s unreachable: %s", instance_id, reason)
        watcher = self._watchers.get(instance_id)
        if watcher is not None and watcher.done():
            self._mark_dead(inst, reason)
        return True

    def _mark_dead(self, inst: Instance, reason: str) -> None:
        if inst.state == InstanceState.DEAD:
            return
        log.error("instance %s is dead: %s", inst.instance_id, reason)
        inst.state = InstanceState.DEAD
        inst.death_reason = reason
        self._forget_cache(inst.instance_id)
        self._changed(inst)
        if self.rc.respawn_dead and not self._stopping:
            self._spawn(self._respawn(inst))

    async def _respawn(self, inst: Instance) -> None:
        """Replaces a dead instance with a fresh actor of the same name; it rejoins when ready."""
        old = inst.actor
        if old is not None:
            await asyncio.to_thread(self.spawner.kill, old)  # a hung actor must not come back half-way
        delay = 1.0
        while not self._stopping:
            try:
                actor = self.spawner.spawn(inst.role, inst.instance_id)
                # Each actor behind the name is a new incarnation, counted (and stored) at once:
                # front ends and a scheduler restarted meanwhile must never take it for the old one.
                inst.restarts += 1
                self._save_restarts()
                inst.actor, inst.state = actor, InstanceState.STARTING
                inst.forget_requests()
                inst.load = None
                self._changed(inst)
                info = await asyncio.wait_for(actor.info.remote(), self.rc.startup_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any start-up failure (name not yet free, ...): retry
                log.error("respawning %s failed (%s); retrying in %.0fs", inst.instance_id, exc, delay)
                inst.state = InstanceState.DEAD
                if inst.actor is not old:
                    await asyncio.to_thread(self.spawner.kill, inst.actor)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            inst.info = info
            inst.state = InstanceState.READY
            self._changed(inst)
            log.warning("instance %s is back (restart %d)", inst.instance_id, inst.restarts)
            self._watchers[inst.instance_id] = self._spawn(self._watch(inst, actor))
            return

    async def add_instance(self, role: str) -> str:
        """Scale-out: a new engine of `role`; it joins its pool once ready. Its id."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        index = 0
        while f"{role}-{index}" in self.instances:
            index += 1
        iid = f"{role}-{index}"
        inst = Instance(info=_placeholder(iid, role, self.config.engine.model),
                        actor=self.spawner.spawn(role, iid), state=InstanceState.STARTING)
        self.instances[iid] = inst
        self._save_members()
        self._changed(inst)
        self._spawn(self._bring_up(inst, adopted=False))
        return iid

    async def remove_instance(self, instance_id: str, drain_timeout_s: float | None = None) -> dict:
        """Scale-in: drains the instance (its decode requests migrate away) and stops it."""
        inst = self.instances.get(instance_id)
        if inst is None:
            return error_reply(RequestError(grpc.StatusCode.NOT_FOUND, f"no instance {instance_id!r}"))
        result = None
        if inst.serving:
            result = await self.migration.drain(instance_id, drain_timeout_s)
        watcher = self._watchers.pop(instance_id, None)
        if watcher is not None:
            watcher.cancel()
        del self.instances[instance_id]
        self._forget_cache(instance_id)
        self.view_changed(inst)  # out of the ready sets and the index
        self._save_members()
        self.view_version += 1
        if inst.actor is not None:
            await asyncio.to_thread(self.spawner.kill, inst.actor)
        return {"instance_id": instance_id, "remaining": result.remaining if result else 0}

    def _changed(self, inst: Instance) -> None:
        """Membership, state or incarnation changed: front ends refresh their view."""
        self.view_version += 1
        self.view_changed(inst)

    def view_changed(self, inst: Instance) -> None:
        """State, load or placement changed: keep the ready sets and the dispatch index current
        (dispatch then never passes over every instance)."""
        iid = inst.instance_id
        ready, unloaded = self._ready_ids.setdefault(inst.role, set()), self._unloaded_ids.setdefault(inst.role, set())
        members = self._role_members.setdefault(inst.role, set())
        if self.instances.get(iid) is inst:
            members.add(iid)
        else:
            members.discard(iid)
        if inst.ready and self.instances.get(iid) is inst:
            ready.add(iid)
        else:
            ready.discard(iid)
        if iid in ready and inst.load is None:
            unloaded.add(iid)
        else:
            unloaded.discard(iid)
        if inst.role != "decode":
            return
        if inst.serving and inst.load is not None:
            self.index.update(self.migration.decode_view(inst))
        else:
            self.index.remove(iid)

    # ---- dispatch ----
    def place(self, role: str, engine_request_id: str, num_tokens: int, priority: int = 0, owner: str = "",
              exclude: tuple[str, ...] = (), prefix_hashes: tuple[int, ...] = (), session_id: str = "") -> dict:
        """Where a request of `role` goes: {"instance_id", "restarts"}, or {"wait": reason} while
        every candidate is (re)starting, or {"error": ...}. Counted on the instance at once.
        `prefix_hashes`: the prompt's block names (cluster/kv/prefix_hash.py) for prefix-aware
        routing of prompts; `session_id`: the conversation, kept on its instance (soft)."""
        if not self.started:
            return {"wait": "the scheduler is starting"}
        def choose(skip: set[str]) -> str | None:
            if role in ("prefill", "colocated"):
                return self._choose_for_prompt(role, num_tokens, skip, prefix_hashes, session_id)
            return self._choose(role, num_tokens, priority, skip)

        chosen = choose(set(exclude))
        if chosen is None and exclude:
            # The excluded instances failed this request's earlier attempt; with no other one
            # ready, a replacement under the same id (respawned) or the same one may take it
            # (the request's replay budget bounds the retries).
            chosen = choose(set())
        if chosen is None:
            # A pool whose every instance is being (re)started: wait for it, even for the one
            # that failed the request (its replacement is a fresh engine).
            coming = any(i.role == role and
                         (i.state == InstanceState.STARTING or (i.state == InstanceState.DEAD and self.rc.respawn_dead))
                         for i in self.instances.values())
            if coming:
                return {"wait": f"every {role} instance is starting"}
            return error_reply(RequestError(grpc.StatusCode.UNAVAILABLE, f"no {role} instance is available"))
        inst = self.instances[chosen]
        request_id = engine_request_id.rpartition("@")[0] or engine_request_id
        if role == "decode":  # a hand-off: the prefill that ran this id is done with it
            for pid in self._role_members.get("prefill", ()):  # not a pass over every instance
                other = self.instances.get(pid)
                if other is not None and engine_request_id in other.pending:
                    other.unplace(engine_request_id)
        inst.place(Pending(engine_request_id, request_id, num_tokens, priority, owner))
        self.view_changed(inst)
        return {"instance_id": chosen, "restarts": inst.restarts}

    def _choose_for_prompt(self, role: str, num_tokens: int, exclude: set[str], prefix_hashes,
                           session_id: str) -> str | None:
        """Prefill / colocated dispatch: router/prefix_index.py's cost model over the ready
        instances (cached prefix vs queued tokens, soft session affinity); counted by reason."""
        ready = [self.instances[i] for i in self._ready_ids.get(role, set()) if i not in exclude]
        if not ready:
            return None
        pr = self.config.prefix_routing
        matched = self.prefixes.matched_blocks(list(prefix_hashes), (i.instance_id for i in ready)) \
            if prefix_hashes else {}
        candidates = [RouteCandidate(i.instance_id,
                                     (i.load.queued_prompt_tokens if i.load else 0) + i.pending_prompt_tokens(),
                                     len(i.in_flight), matched.get(i.instance_id, 0) * i.info.block_size)
                      for i in ready]
        config = RouteConfig(use_prefix=pr.policy == "prefix", session_slack_tokens=pr.session_slack_tokens,
                             request_cost_tokens=pr.colocated_request_cost_tokens if role == "colocated" else 0)
        route = choose(candidates, num_tokens, config, self.sessions.get(session_id))
        self.metrics.routing.labels(role=role, reason=route.reason).inc()
        self.metrics.routing_cached_tokens.labels(role=role).inc(min(route.cached_tokens, num_tokens))
        self.sessions.put(session_id, route.instance_id)
        return route.instance_id

    def _forget_cache(self, instance_id: str) -> None:
        """The instance's KV cache is gone (dead, replaced, removed)."""
        self.prefixes.forget(instance_id)
        self.sessions.forget_instance(instance_id)

    def routing_status(self) -> dict:
        decisions: dict[str, dict[str, int]] = {}
        for metric in self.metrics.routing.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    decisions.setdefault(sample.labels["role"], {})[sample.labels["reason"]] = int(sample.value)
        cached = {}
        for metric in self.metrics.routing_cached_tokens.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    cached[sample.labels["role"]] = int(sample.value)
        return {"policy": self.config.prefix_routing.policy, "decisions": decisions,
                "expected_cached_tokens": cached, "sessions": len(self.sessions),
                "indexed_blocks": {iid: self.prefixes.num_blocks(iid) for iid in sorted(self.instances)
                                   if self.instances[iid].role != "decode"}}

    def unplace(self, instance_id: str, engine_request_id: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is not None:
            inst.unplace(engine_request_id)
            self.view_changed(inst)

    def _choose(self, role: str, num_tokens: int, priority: int, exclude: set[str]) -> str | None:
        ready_ids = self._ready_ids.get(role, set())
        if role == "decode" and ready_ids and not self._unloaded_ids.get(role):
            # Every ready decode instance has a load: Llumnix freeness over the index.
            block_size = self.instances[next(iter(ready_ids))].info.block_size
            needed = blocks_for_tokens(num_tokens + 1, block_size)
            if exclude:  # a replay: the index holds every instance, the excluded one too
                views = [self.migration.decode_view(self.instances[i]) for i in ready_ids if i not in exclude]
                chosen = pick_dispatch(views, self.migration.freeness, needed, priority)
            else:
                chosen = self.index.pick(needed, priority)
            if chosen is not None:
                return chosen
        ready = [self.instances[i] for i in ready_ids if i not in exclude]
        if role == "decode":
            # Nothing fits right now (or no load seen yet): the freest by plain free blocks; the
            # engine queues the request until blocks free up.
            return freest(self._candidates(ready))
        policy = fewest_queued_prompt_tokens if role == "prefill" else least_loaded
        return policy(self._candidates(ready))

    @staticmethod
    def _candidates(ready: list[Instance]) -> list[Candidate]:
        return [Candidate(i.instance_id, len(i.in_flight), i.load.num_free_blocks if i.load else 0,
                          (i.load.queued_prompt_tokens if i.load else 0) + i.pending_prompt_tokens())
                for i in ready]

    # ---- front ends ----
    def frontend_heartbeat(self, frontend_id: str, info: dict, stats: dict, known_version=None) -> dict:
        """A front end says it is alive (registering on its first call); the reply carries the
        instance view when it changed since `known_version`, and the migration metrics."""
        entry = self.frontends.get(frontend_id)
        if entry is None:
            entry = self.frontends[frontend_id] = FrontEndEntry(frontend_id, {})
            log.info("front end %s registered (%s)", frontend_id, info.get("address"))
        entry.last_seen = time.monotonic()
        if entry.info != info:  # registered, or its address became known: a restarted scheduler lists it too
            entry.info = dict(info)
            self._save_frontends()
        entry.stats = dict(stats)
        # A restarted scheduler counts versions anew: the version names its incarnation too.
        version = (self.incarnation, self.view_version)
        reply = {"version": version, "incarnation": self.incarnation,
                 "migration_metrics": migration_metrics_text(self.metrics)}
        if known_version != version and self.started:
            reply["instances"] = self.instance_view()
        return reply

    def instance_view(self) -> list[dict]:
        return [{"info": i.info, "state": i.state.value, "restarts": i.restarts}
                for i in sorted(self.instances.values(), key=lambda i: i.instance_id)]

    async def _frontend_reaper(self) -> None:
        """Forgets front ends long gone (they show as gone in status meanwhile)."""
        while not self._stopping:
            await asyncio.sleep(self.dc.frontend_timeout_s)
            horizon = time.monotonic() - 30 * self.dc.frontend_timeout_s
            gone = [f for f, e in self.frontends.items() if e.last_seen < horizon]
            for fid in gone:
                del self.frontends[fid]
            if gone:
                self._save_frontends()

    def _save_frontends(self) -> None:
        self.store.put("frontends", json.dumps({f: e.info for f, e in self.frontends.items()}))

    def _load_frontends(self) -> None:
        """The front ends the previous incarnation knew: each shows as serving until it misses
        the heartbeat timeout (one that died meanwhile then shows as gone)."""
        for fid, info in json.loads(self.store.get("frontends") or "{}").items():
            self.frontends.setdefault(fid, FrontEndEntry(fid, dict(info)))

    # ---- admin (called by any front end) ----
    async def migrate(self, request_id: str, target: str | None = None, trigger: str = "admin",
                      mode: str = "live"):
        await self.wait_started()
        try:
            return await self.migration.migrate(request_id, target, trigger, mode)
        except RequestError as exc:
            return error_reply(exc)

    async def drain(self, instance_id: str, timeout_s: float | None = None):
        await self.wait_started()
        try:
            return await self.migration.drain(instance_id, timeout_s)
        except RequestError as exc:
            return error_reply(exc)

    def undrain(self, instance_id: str):
        try:
            self.migration.undrain(instance_id)
            return {"instance_id": instance_id}
        except RequestError as exc:
            return error_reply(exc)

    def migration_stats(self):
        return self.migration.stats

    def migration_resumed(self, migration_id: str, downtime_s: float, first_token_wall: float) -> bool:
        return self.migration.resumed(migration_id, downtime_s, first_token_wall)

    def abort_request(self, request_id: str) -> int:
        """Aborts client request `request_id` wherever it runs (an Abort that reached another
        front end than the stream's); its owner's stream ends with finish reason abort."""
        found = self.migration.find(request_id)
        for inst, live in found:
            self.fire(inst.actor.abort.remote([live.request_id]))
        return len(found)

    def status(self) -> dict:
        """Everything `disagg-serve status` shows, but the asking front end's own numbers."""
        now = time.monotonic()
        roles = {i.role for i in self.instances.values()}
        frontends = []
        for entry in sorted(self.frontends.values(), key=lambda e: e.frontend_id):
            silent = now - entry.last_seen
            frontends.append({**entry.info, **entry.stats, "frontend_id": entry.frontend_id,
                              "state": "serving" if silent < self.dc.frontend_timeout_s else "gone",
                              "last_seen_s": silent})
        return {
            "deployment": self.dc.name,
            "model": self.config.engine.model,
            "mode": "disaggregated" if {"prefill", "decode"} <= roles else "colocated",
            "instances": [{"info": i.info, "state": i.state.value, "load": i.load,
                           "requests_served": i.requests_served + (i.load.requests_finished if i.load else 0),
                           "death_reason": i.death_reason or "", "restarts": i.restarts}
                          for i in sorted(self.instances.values(), key=lambda i: i.instance_id)],
            "migrations": self.migration.snapshot(),
            "routing": self.routing_status(),
            "frontends": frontends,
            "scheduler": {"uptime_s": time.time() - self.started_at, "restarts": self.incarnation - 1,
                          "started_at": self.started_at, "pid": os.getpid(),
                          "state": "serving" if self.started else "starting"},
        }

    def describe(self) -> dict:
        """The config this deployment runs (a reattaching `up` compares its own with it)."""
        return dataclasses.asdict(self.config)

    def ready_state(self) -> dict:
        """{instance id: state} (the launcher waits on it and prints progress)."""
        return {iid: (i.state.value, i.info.pid, i.info.node_id, i.info.num_total_blocks, i.info.block_size,
                      i.death_reason or "")
                for iid, i in sorted(self.instances.items())}

    # ---- helpers ----
    async def call_actor(self, ref):
        return await asyncio.wait_for(ref, timeout=self.rc.actor_call_timeout_s)

    def fire(self, ref) -> None:
        """A best-effort call with a deadline whose result nobody waits for."""
        fire(self.call_actor(ref))

    def _spawn(self, coro) -> asyncio.Task:
        return spawn_tracked(coro, self._tasks)

    spawn = _spawn


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _role_of(instance_id: str) -> str:
    role = instance_id.rpartition("-")[0]
    if role not in ROLES:
        raise ValueError(f"engine {instance_id!r} has no known role")
    return role


def _placeholder(instance_id: str, role: str, model: str) -> InstanceInfo:
    """The info of an instance that has not answered yet."""
    return InstanceInfo(instance_id, role, "", model, 0, 0, 0, 0, (), None)
