"""GlobalScheduler on fake engine actors and a fake spawner (no Ray): it starts or adopts the
deployment's engines, counts placements until snapshots show them, replaces dead engines, keeps
its own restart count and the instances' in its store, knows its front ends, and aborts a
request wherever it runs."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from cluster.config import DeploymentConfig, EngineConfig, MigrationConfig, PoolConfig, RouterConfig, ServeConfig
from cluster.protocol import EngineSnapshot, InstanceInfo, LiveRequest, LoadReport
from router.instances import InstanceState
from router.scheduler import GlobalScheduler, MemoryStore, raise_if_error
from tests.unit.router.fakes import FakeActor

_pids = itertools.count(1000)


class FakeEngine(FakeActor):
    """An engine actor: info() answers once `ready` is set; snapshot() shows `requests`."""

    def __init__(self, instance_id: str):
        super().__init__(instance_id)
        self.instance_id = instance_id
        self.role = instance_id.rpartition("-")[0]
        self.pid = next(_pids)
        self.requests: list[LiveRequest] = []
        self.dead = False
        self.handlers.update(info=self._info, snapshot=self._snapshot, shutdown=lambda: None)

    def _check(self):
        if self.dead:
            raise RuntimeError(f"{self.instance_id} died")

    def _info(self):
        self._check()
        return InstanceInfo(self.instance_id, self.role, "node", "m", 1024, 16, 100, 1000, (2,), 1, pid=self.pid)

    def _snapshot(self):
        self._check()
        load = LoadReport(self.instance_id, 100, 100 - 5 * len(self.requests), len(self.requests), 0, 0)
        return EngineSnapshot(load=load, requests=tuple(self.requests))


class FakeSpawner:
    def __init__(self, running: dict[str, FakeEngine] | None = None):
        self.running = dict(running or {})
        self.spawned: list[str] = []
        self.killed: list[str] = []

    def spawn(self, role, instance_id):
        engine = FakeEngine(instance_id)
        self.running[instance_id] = engine
        self.spawned.append(instance_id)
        return engine

    def find(self, instance_id):
        return self.running.get(instance_id)

    def running_instances(self):
        return sorted(self.running)

    def kill(self, actor):
        actor.dead = True
        self.killed.append(actor.instance_id)
        if self.running.get(actor.instance_id) is actor:
            del self.running[actor.instance_id]


TWO_COLOCATED = (PoolConfig("colocated", 2),)


def config(pools=TWO_COLOCATED, **migration_kw) -> ServeConfig:
    migration_kw.setdefault("enabled", False)
    return ServeConfig(engine=EngineConfig(model="m"), pools=pools, router=RouterConfig(actor_call_timeout_s=1.0),
                       migration=MigrationConfig(**migration_kw),
                       deployment=DeploymentConfig(load_interval_s=0.01, frontend_timeout_s=0.2))


async def started(cfg: ServeConfig, spawner: FakeSpawner, store=None) -> GlobalScheduler:
    sched = GlobalScheduler(cfg, spawner, store or MemoryStore(), autostart=False)
    await sched.start()
    await wait_for(lambda: all(i.state == InstanceState.READY and i.load is not None
                               for i in sched.instances.values()))
    return sched


async def wait_for(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(coro)


def test_a_fresh_deployment_spawns_its_pools():
    spawner = FakeSpawner()

    async def go():
        sched = await started(config((PoolConfig("prefill", 1), PoolConfig("decode", 2))), spawner)
        view = sched.instance_view()
        await sched.stop()
        return sched, view

    sched, view = run(go())
    assert spawner.spawned == ["decode-0", "decode-1", "prefill-0"]
    assert [(v["info"].instance_id, v["state"], v["restarts"]) for v in view] == [
        ("decode-0", "ready", 0), ("decode-1", "ready", 0), ("prefill-0", "ready", 0)]
    assert sched.incarnation == 1 and sched.status()["mode"] == "disaggregated"


def test_an_engine_gone_while_the_scheduler_was_down_comes_back_as_a_new_incarnation():
    store = MemoryStore()
    spawner = FakeSpawner()

    async def go():
        first = await started(config(), spawner, store)
        await first.stop()  # the scheduler dies; then so does an engine (its name is free again)
        spawner.kill(spawner.running["colocated-0"])
        second = await started(config(), spawner, store)
        view = {v["info"].instance_id: v["restarts"] for v in second.instance_view()}
        await second.stop()
        return view

    view = run(go())
    assert spawner.spawned == ["colocated-0", "colocated-1", "colocated-0"]
    # A front end still holding the dead actor sees restarts change and looks the name up again.
    assert view == {"colocated-0": 1, "colocated-1": 0}
    assert '"colocated-0": 1' in store.get("restarts")


def test_a_restarted_scheduler_lists_the_front_ends_its_predecessor_knew():
    store = MemoryStore()

    async def go():
        first = await started(config(), FakeSpawner(), store)
        first.frontend_heartbeat("fe-a", {"address": "h:1", "pid": 7}, {})
        first.frontend_heartbeat("fe-b", {"address": "h:2", "pid": 8}, {})
        await first.stop()
        second = await started(config(), FakeSpawner(), store)
        second.frontend_heartbeat("fe-a", {"address": "h:1", "pid": 7}, {})  # fe-b died meanwhile
        await asyncio.sleep(0.3)  # past frontend_timeout_s
        second.frontend_heartbeat("fe-a", {"address": "h:1", "pid": 7}, {})
        fronts = {f["frontend_id"]: (f["state"], f["address"]) for f in second.status()["frontends"]}
        await second.stop()
        return fronts

    assert run(go()) == {"fe-a": ("serving", "h:1"), "fe-b": ("gone", "h:2")}


def test_a_restarted_scheduler_adopts_the_running_engines_and_their_requests():
    store = MemoryStore()
    spawner = FakeSpawner()

    async def go():
        first = await started(config(), spawner, store)
        pids = {iid: i.info.pid for iid, i in first.instances.items()}
        await first.stop()  # the actor died; the engines did not
        spawner.running["colocated-1"].requests = [LiveRequest("r@1.fe", "fe-a", 10, 3, 0, 1.0)]
        second = await started(config(), spawner, store)
        await wait_for(lambda: "r" in second.instances["colocated-1"].in_flight)
        out = second, pids, {iid: i.info.pid for iid, i in second.instances.items()}
        await second.stop()
        return out

    second, before, after = run(go())
    assert spawner.spawned == ["colocated-0", "colocated-1"]  # nothing spawned the second time
    assert before == after  # the same engines (same pids)
    assert second.incarnation == 2 and second.status()["scheduler"]["restarts"] == 1
    assert second.instances["colocated-1"].requests["r@1.fe"].owner == "fe-a"


def test_placements_count_until_a_snapshot_shows_them():
    spawner = FakeSpawner()

    async def go():
        sched = await started(config(), spawner)
        sched.migration.stop()
        choices = [sched.place("colocated", f"r{i}@1.fe", 10, owner="fe")["instance_id"] for i in range(4)]
        pending = {iid: set(i.pending) for iid, i in sched.instances.items()}
        # The engines report them: pending entries turn into reported requests.
        for iid, engine in spawner.running.items():
            engine.requests = [LiveRequest(e, "fe", 10, 0) for e in pending[iid]]
        await wait_for(lambda: all(not i.pending for i in sched.instances.values()))
        in_flight = {iid: set(i.in_flight) for iid, i in sched.instances.items()}
        await sched.stop()
        return choices, pending, in_flight

    choices, pending, in_flight = run(go())
    assert choices == ["colocated-0", "colocated-1", "colocated-0", "colocated-1"]  # least loaded
    assert pending == {"colocated-0": {"r0@1.fe", "r2@1.fe"}, "colocated-1": {"r1@1.fe", "r3@1.fe"}}
    assert in_flight == {"colocated-0": {"r0", "r2"}, "colocated-1": {"r1", "r3"}}


def test_place_waits_while_instances_start_and_fails_when_none_can_come():
    async def go():
        sched = GlobalScheduler(config((PoolConfig("colocated", 1),)), FakeSpawner(), autostart=False)
        await sched.start()
        waiting = sched.place("colocated", "r@1", 10)  # still starting
        none = sched.place("decode", "r@1", 10)
        excluded = None
        await wait_for(lambda: sched.instances["colocated-0"].ready)
        excluded = sched.place("colocated", "r@2", 10, exclude=("colocated-0",))
        await sched.stop()
        return waiting, none, excluded

    waiting, none, excluded = run(go())
    assert "wait" in waiting
    assert none["error"]["code"] == "UNAVAILABLE"
    with pytest.raises(Exception, match="no decode instance"):
        raise_if_error(none)
    # The only instance failed the request before: with no other one, it takes the replay
    # (a respawned instance keeps its id; the replay budget bounds the retries).
    assert excluded["instance_id"] == "colocated-0"


def test_a_replay_waits_for_the_replacement_of_the_only_instance_that_failed_it():
    class GatedSpawner(FakeSpawner):
        """Replacements answer info() only once the test opens the gate."""

        def __init__(self):
            super().__init__()
            self.gate = asyncio.Event()

        def spawn(self, role, instance_id):
            engine = super().spawn(role, instance_id)
            if len(self.spawned) > 1:
                plain = engine.handlers["info"]

                async def gated():
                    await self.gate.wait()
                    return plain()

                engine.handlers["info"] = gated
            return engine

    spawner = GatedSpawner()

    async def go():
        sched = await started(config((PoolConfig("colocated", 1),)), spawner, MemoryStore())
        spawner.running["colocated-0"].dead = True  # its next snapshot fails: it is replaced
        await wait_for(lambda: len(spawner.spawned) == 2)
        during = sched.place("colocated", "r@2", 10, exclude=("colocated-0",))
        spawner.gate.set()
        await wait_for(lambda: sched.instances["colocated-0"].ready)
        after = sched.place("colocated", "r@3", 10, exclude=("colocated-0",))
        await sched.stop()
        return during, after

    during, after = run(go())
    assert "wait" in during, during
    assert after["instance_id"] == "colocated-0"


def test_a_dead_engine_is_replaced_and_counted():
    store = MemoryStore()
    spawner = FakeSpawner()

    async def go():
        sched = await started(config(), spawner, store)
        old = spawner.running["colocated-0"]
        old.dead = True  # its next snapshot fails
        await wait_for(lambda: sched.instances["colocated-0"].restarts == 1
                       and sched.instances["colocated-0"].state == InstanceState.READY)
        out = sched.instances["colocated-0"].info.pid, old.pid
        await sched.stop()
        return out

    new_pid, old_pid = run(go())
    assert spawner.killed == ["colocated-0"] and spawner.spawned.count("colocated-0") == 2
    assert new_pid != old_pid
    assert '"colocated-0": 1' in store.get("restarts")  # a restarted scheduler shows it too


def test_front_ends_register_get_the_view_when_it_changes_and_go_stale():
    async def go():
        sched = await started(config(), FakeSpawner())
        first = sched.frontend_heartbeat("fe-a", {"address": "h:1", "pid": 7}, {"requests_in_flight": 2})
        again = sched.frontend_heartbeat("fe-a", {"address": "h:1", "pid": 7}, {"requests_in_flight": 3},
                                         first["version"])
        sched.frontend_heartbeat("fe-b", {"address": "h:2", "pid": 8}, {"requests_in_flight": 1})
        await asyncio.sleep(0.3)  # fe-b silent past frontend_timeout_s; fe-a reports again
        sched.frontend_heartbeat("fe-a", {"address": "h:1", "pid": 7}, {"requests_in_flight": 0}, first["version"])
        status = sched.status()
        await sched.stop()
        return first, again, status

    first, again, status = run(go())
    assert [v["info"].instance_id for v in first["instances"]] == ["colocated-0", "colocated-1"]
    assert "instances" not in again  # nothing changed since
    assert "migration_metrics" in first
    fronts = {f["frontend_id"]: f for f in status["frontends"]}
    assert fronts["fe-a"]["state"] == "serving" and fronts["fe-a"]["requests_in_flight"] == 0
    assert fronts["fe-b"]["state"] == "gone" and fronts["fe-b"]["address"] == "h:2"


def test_abort_request_reaches_the_engine_that_runs_it():
    spawner = FakeSpawner()

    async def go():
        sched = await started(config(), spawner)
        spawner.running["colocated-1"].requests = [LiveRequest("r@1.fe~m3", "fe-a", 10, 3)]
        await wait_for(lambda: "r" in sched.instances["colocated-1"].in_flight)
        found, missing = sched.abort_request("r"), sched.abort_request("nope")
        await asyncio.sleep(0)
        await sched.stop()
        return found, missing

    found, missing = run(go())
    assert (found, missing) == (1, 0)
    assert spawner.running["colocated-1"].called("abort") == [(["r@1.fe~m3"],)]


def test_scale_out_and_in_change_membership():
    store = MemoryStore()
    spawner = FakeSpawner()

    async def go():
        sched = await started(config((PoolConfig("decode", 1),)), spawner, store)
        iid = await sched.add_instance("decode")
        await wait_for(lambda: sched.instances[iid].ready)
        removed = await sched.remove_instance("decode-0", 1.0)
        members = sorted(sched.instances)
        await sched.stop()
        return iid, removed, members

    iid, removed, members = run(go())
    assert iid == "decode-1" and members == ["decode-1"]
    assert removed == {"instance_id": "decode-0", "remaining": 0}
    assert spawner.killed == ["decode-0"] and '"decode-1"' in store.get("members")


def test_before_its_view_is_rebuilt_a_restarted_scheduler_answers_nothing_from_it():
    """Ray serves calls to a restarted actor while its start() still finds the engines: a front
    end must not get an empty instance list then (it would drop every engine it knows)."""
    sched = GlobalScheduler(config(), FakeSpawner(), autostart=False)
    reply = sched.frontend_heartbeat("fe-a", {}, {}, known_version=7)
    assert "instances" not in reply
    assert "wait" in sched.place("colocated", "r@1", 10)
    assert sched.status()["scheduler"]["state"] == "starting"
