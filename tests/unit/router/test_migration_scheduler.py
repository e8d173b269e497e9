"""The scheduler's side of migration policy (router/migration_scheduler.py), on fake instances
(no Ray, no engines): decode views from load reports and snapshots, the balancing round
(pairing + request selection), target choice, and the precondition errors of migrate / drain /
undrain. The migration itself is stubbed."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cluster.config import MigrationConfig, RouterConfig
from cluster.protocol import InstanceInfo, LiveRequest, LoadReport
from router.errors import RequestError
from router.instances import Instance, InstanceState
from router.migration_scheduler import MigrationScheduler
from router.migration_types import MigrationRecord, MigrationState
from router.scheduler import GlobalScheduler

BLOCK = 16
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


class FakeRegistry:
    call_actor = GlobalScheduler.call_actor
    fire = GlobalScheduler.fire
    spawn = GlobalScheduler._spawn

    def __init__(self, instances):
        self.rc = RouterConfig()
        self.instances = {i.instance_id: i for i in instances}
        self._tasks: set = set()

    def view_changed(self, inst) -> None:
        pass


def instance(iid: str, free: int = 900, running: int = 0, role: str = "decode", total: int = 1000,
             waiting: int = 0, head: int = 0, state: InstanceState = InstanceState.READY,
             load: bool = True) -> Instance:
    info = InstanceInfo(iid, role, "node", "m", 4096, BLOCK, total, 1000, (2,), 1)
    report = LoadReport(iid, total, free, running, waiting, 0, head_waiting_blocks=head) if load else None
    return Instance(info, actor=object(), state=state, load=report)


def make_router(instances, **migration_kw) -> MigrationScheduler:
    migration_kw.setdefault("enabled", False)
    return MigrationScheduler(FakeRegistry(instances), MigrationConfig(**migration_kw))


def place(router: MigrationScheduler, request_id: str, iid: str, prompt_len: int = 32, outputs: int = 0,
          priority: int = 0, age_s: float = 10.0) -> LiveRequest:
    """A request the instance's snapshot shows running."""
    live = LiveRequest(f"{request_id}@1", "fe", prompt_len, outputs, priority, time.time() - age_s)
    inst = router.instances[iid]
    inst.requests[live.request_id] = live
    inst.in_flight.add(request_id)
    return live


def unplace(router: MigrationScheduler, request_id: str, iid: str) -> None:
    inst = router.instances[iid]
    del inst.requests[f"{request_id}@1"]
    inst.in_flight.discard(request_id)


def balance(router: MigrationScheduler):
    """One balance_once round with the migration stubbed; returns (started, recorded calls)."""
    calls = []

    async def record(request_id, target, trigger):
        calls.append((request_id, target, trigger))

    router.migrate_quietly = record

    async def go():
        started = router.balance_once()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return started

    return asyncio.run(go()), calls


# ---------------------------------------------------------------- decode views

def test_decode_views_cover_serving_decode_instances_with_a_load():
    instances = [
        instance("d0", free=1500, total=1000, running=1),  # free clipped to total
        instance("d1", free=100, running=1, state=InstanceState.DRAINING),
        instance("d2", state=InstanceState.DEAD),
        instance("d3", state=InstanceState.STARTING),
        instance("d4", load=False),
        instance("p0", role="prefill"),
    ]
    router = make_router(instances, high_priority_threshold=3)
    place(router, "a", "d1", priority=5)
    place(router, "b", "d1", priority=0)
    place(router, "c", "d1", priority=3)
    router.instances["d0"].migrating = "m1"
    views = {v.instance_id: v for v in router.decode_views()}
    assert set(views) == {"d0", "d1"}
    assert views["d0"].num_free_blocks == 1000 and views["d0"].migrating and not views["d0"].draining
    d1 = views["d1"]
    assert d1.draining and not d1.migrating
    assert d1.num_running == 3  # the scheduler's in_flight beats a stale report of 1
    assert d1.high_priority_running == 2  # priorities 5 and 3 (threshold 3)


# ---------------------------------------------------------------- balancing rounds

def test_pairs_most_loaded_source_with_freest_destination():
    router = make_router([
        instance("hot", free=10, running=10),      # freeness 1.0: most loaded
        instance("warm", free=15, running=10),     # 1.5
        instance("ok", free=100, running=10),      # 10: a destination too, the least free one
        instance("free", free=900, running=1),     # 900
        instance("freer", free=950, running=1),    # 950: freest
    ])
    place(router, "h1", "hot")
    place(router, "w1", "warm")
    started, calls = balance(router)
    assert started == [("h1", "hot", "freer"), ("w1", "warm", "free")]
    assert calls == [("h1", "freer", "balance"), ("w1", "free", "balance")]


def test_no_source_below_threshold_means_no_migration():
    router = make_router([instance("a", free=500, running=10), instance("b", free=900, running=1)])
    place(router, "r", "a")
    assert balance(router) == ([], [])


@pytest.mark.parametrize("selection,expected", [("last", "young"), ("shortest", "short"), ("longest", "long")])
def test_selection_policy_picks_the_request(selection, expected):
    router = make_router([instance("src", free=10, running=10), instance("dst", free=900, running=1)],
                         selection=selection)
    place(router, "young", "src", prompt_len=100, age_s=1.0)   # 7 blocks
    place(router, "short", "src", prompt_len=20, age_s=50.0)   # 2 blocks
    place(router, "long", "src", prompt_len=300, outputs=40, age_s=30.0)  # 22 blocks
    started, calls = balance(router)
    assert started == [(expected, "src", "dst")]
    assert calls == [(expected, "dst", "balance")]


def test_only_requests_that_fit_the_destination_are_candidates():
    router = make_router([instance("src", free=10, running=10), instance("dst", free=20, running=1)],
                         selection="longest")
    place(router, "huge", "src", prompt_len=1000)  # 63 blocks: more than dst's 20 free
    place(router, "small", "src", prompt_len=100)
    assert balance(router)[0] == [("small", "src", "dst")]
    unplace(router, "small", "src")
    assert balance(router) == ([], [])


def test_high_priority_requests_stay_put_unless_draining():
    router = make_router([instance("src", free=10, running=10), instance("dst", free=900, running=1)],
                         selection="shortest")
    place(router, "vip", "src", prompt_len=16, priority=5)  # the shortest, but high-priority
    place(router, "normal", "src", prompt_len=200)
    assert balance(router)[0] == [("normal", "src", "dst")]
    unplace(router, "normal", "src")
    assert balance(router) == ([], [])  # only the high-priority one is left: it stays
    router.instances["src"].state = InstanceState.DRAINING
    assert balance(router)[0] == [("vip", "src", "dst")]  # draining moves everything


def test_lower_priority_moves_first():
    router = make_router([instance("src", free=10, running=10), instance("dst", free=900, running=1)])
    place(router, "normal", "src", age_s=1.0)
    place(router, "background", "src", priority=-1, age_s=100.0)
    assert balance(router)[0] == [("background", "src", "dst")]


def test_draining_instance_is_a_source_whatever_its_freeness():
    router = make_router([instance("drain", free=900, running=2, state=InstanceState.DRAINING),
                          instance("dst", free=900, running=1)])
    place(router, "r", "drain")
    assert balance(router)[0] == [("r", "drain", "dst")]


def test_one_migration_per_instance():
    router = make_router([instance("src", free=10, running=10), instance("dst", free=950, running=1),
                          instance("dst2", free=900, running=1)])
    place(router, "r", "src")
    router.instances["dst"].migrating = "m-other"
    assert balance(router)[0] == [("r", "src", "dst2")]  # the busy destination is skipped
    router.instances["src"].migrating = "m-other"
    assert balance(router) == ([], [])  # a migrating source gives nothing more


def test_requests_already_moving_backing_off_or_not_reported_yet_are_skipped():
    router = make_router([instance("src", free=10, running=10), instance("dst", free=900, running=1)])
    place(router, "moving", "src")
    router._moving["moving"] = "m"
    place(router, "refused", "src")
    router._backoff["refused"] = time.monotonic() + 60  # its last migration was refused
    router.instances["src"].in_flight.add("pending")  # placed, not in a snapshot yet
    assert balance(router) == ([], [])
    place(router, "r", "src")
    assert balance(router)[0] == [("r", "src", "dst")]


# ---------------------------------------------------------------- migration targets

def test_explicit_target_errors():
    router = make_router([instance("d0", free=10, running=4), instance("d1"), instance("p0", role="prefill"),
                          instance("d2", state=InstanceState.DRAINING), instance("d3", state=InstanceState.DEAD)])
    state = place(router, "r", "d0")
    src = router.instances["d0"]
    for target, code in (("nope", NOT_FOUND), ("p0", PRECONDITION), ("d2", PRECONDITION),
                         ("d3", PRECONDITION), ("d0", PRECONDITION)):
        with pytest.raises(RequestError) as err:
            router._target("r", state, src, target)
        assert err.value.code == code, target
    assert router._target("r", state, src, "d1") is router.instances["d1"]


def test_automatic_target_is_the_freest_other_instance_not_migrating():
    router = make_router([instance("d0", free=10, running=4), instance("d1", free=900, running=2),
                          instance("d2", free=800, running=1), instance("d3", free=990, running=1)])
    state = place(router, "r", "d0")
    src = router.instances["d0"]
    assert router._target("r", state, src, None).instance_id == "d3"
    router.instances["d3"].migrating = "m"
    assert router._target("r", state, src, None).instance_id == "d2"
    router.instances["d2"].migrating = router.instances["d1"].migrating = "m"
    # Every other one is busy: the freest is named anyway (migrate then refuses it).
    assert router._target("r", state, src, None).instance_id == "d3"


def test_automatic_target_needs_room_for_the_request():
    router = make_router([instance("d0", free=10, running=4), instance("d1", free=5, running=1),
                          instance("d2", free=900, running=1, state=InstanceState.DRAINING)])
    state = place(router, "r", "d0", prompt_len=200)  # 13 blocks
    with pytest.raises(RequestError) as err:
        router._target("r", state, router.instances["d0"], None)
    assert err.value.code == PRECONDITION and "no other decode instance has room" in err.value.message


# ---------------------------------------------------------------- migrate preconditions

class StubMigrator:
    def __init__(self, router, outcome=MigrationState.ABORTED):
        self.router = router
        self.runs = []
        self.outcome = outcome

    async def run(self, rec, req, src, dst, mode="live"):
        self.runs.append((rec.migration_id, src.instance_id, dst.instance_id, mode))
        assert src.migrating == dst.migrating == rec.migration_id
        assert self.router._moving[rec.request_id] == rec.migration_id
        rec.state = self.outcome
        rec.reason = "destination_no_memory: stub" if self.outcome == MigrationState.ABORTED else ""
        return rec


def test_migrate_precondition_errors():
    router = make_router([instance("d0", free=10, running=4), instance("d1"), instance("p0", role="prefill")])
    router.coordinator = StubMigrator(router)
    place(router, "decoding", "d0")
    place(router, "prefilling", "p0")
    place(router, "moving", "d0")
    router._moving["moving"] = "m0"

    def error(request_id, target=None, mode="live"):
        with pytest.raises(RequestError) as err:
            asyncio.run(router.migrate(request_id, target, mode=mode))
        return err.value

    assert error("nope").code == NOT_FOUND  # never placed, or finished (no snapshot shows it)
    assert error("decoding", mode="teleport").code == grpc.StatusCode.INVALID_ARGUMENT
    assert error("prefilling").code == PRECONDITION
    assert "already migrating" in error("moving").message
    assert error("decoding", "d0").code == PRECONDITION  # same instance
    router.instances["d1"].migrating = "m-other"
    e = error("decoding", "d1")
    assert e.code == PRECONDITION and "one at a time" in e.message
    router.instances["d1"].migrating = None
    router.instances["d0"].migrating = "m-other"
    assert "one at a time" in error("decoding", "d1").message
    assert router.coordinator.runs == []  # nothing ever started
    assert router.stats.started == 0


def test_migrate_clears_its_marks_after_an_abort():
    router = make_router([instance("d0", free=10, running=4), instance("d1")], timeout_s=0.1)
    router.coordinator = StubMigrator(router, MigrationState.ABORTED)
    place(router, "r", "d0")
    rec = asyncio.run(router.migrate("r", "d1", trigger="admin"))
    assert rec.state == MigrationState.ABORTED and rec.migration_id == "r@1~m1"
    assert router.coordinator.runs == [("r@1~m1", "d0", "d1", "live")]
    assert router.instances["d0"].migrating is None and router.instances["d1"].migrating is None
    assert "r" not in router._moving
    assert router.stats.started == 1 and router.stats.aborted == 1
    assert router.snapshot()["in_flight"] == []


def test_a_committed_migration_waits_for_its_front_ends_first_token_report():
    router = make_router([instance("d0", free=10, running=4), instance("d1")], timeout_s=5.0)
    router.coordinator = StubMigrator(router, MigrationState.COMMITTED)
    place(router, "r", "d0")

    async def go():
        task = asyncio.ensure_future(router.migrate("r", "d1"))
        await asyncio.sleep(0.05)
        assert not task.done() and router.snapshot()["in_flight"] == []  # committed, awaiting the downtime
        assert router.resumed("r@1~m1", 0.004, time.time())
        return await task

    rec = asyncio.run(go())
    assert rec.state == MigrationState.COMMITTED and rec.downtime_s == 0.004
    assert router.stats.committed == 1 and router.stats.downtimes_s == [0.004]
    assert not router.resumed("r@1~m1", 0.1, time.time())  # finished: a late report changes nothing


# ---------------------------------------------------------------- drain / undrain

def test_drain_and_undrain_precondition_errors():
    router = make_router([instance("d0"), instance("dead", state=InstanceState.DEAD),
                          instance("starting", state=InstanceState.STARTING)])
    for iid, code in (("nope", NOT_FOUND), ("dead", PRECONDITION), ("starting", PRECONDITION)):
        with pytest.raises(RequestError) as err:
            asyncio.run(router.drain(iid))
        assert err.value.code == code, iid
    for iid, code in (("nope", NOT_FOUND), ("d0", PRECONDITION)):
        with pytest.raises(RequestError) as err:
            router.undrain(iid)
        assert err.value.code == code, iid


def test_drain_moves_each_request_off_and_stays_draining_until_undrain():
    router = make_router([instance("d0", free=10, running=2), instance("d1")])
    place(router, "a", "d0")
    place(router, "b", "d0")
    moved = []

    async def migrate(request_id, target=None, trigger="admin", mode="live"):
        assert router.instances["d0"].state == InstanceState.DRAINING
        moved.append((request_id, target, trigger))
        unplace(router, request_id, "d0")
        rec = MigrationRecord(f"{request_id}~m", request_id, "d0", "d1", MigrationState.COMMITTED)
        return rec

    router.migrate = migrate
    result = asyncio.run(router.drain("d0", timeout_s=5.0))
    assert moved == [("a", None, "drain"), ("b", None, "drain")]
    assert (result.migrated, result.failed, result.remaining) == (2, 0, 0)
    assert router.instances["d0"].state == InstanceState.DRAINING
    assert not router.instances["d0"].ready and router.instances["d0"].serving
    router.undrain("d0")
    assert router.instances["d0"].state == InstanceState.READY


def test_drain_deadline_reports_what_is_left():
    router = make_router([instance("d0", free=10, running=1), instance("d1")])
    place(router, "stuck", "d0")

    async def migrate(request_id, target=None, trigger="admin", mode="live"):
        raise RequestError(PRECONDITION, "nowhere to go")

    router.migrate = migrate
    result = asyncio.run(router.drain("d0", timeout_s=0.15))
    assert (result.migrated, result.failed, result.remaining) == (0, 0, 1)


def test_a_handed_off_request_is_found_once_on_its_decode_instance():
    """The prefill's record of a hand-off's engine-side id may lag behind the decode side's:
    one request, not an ambiguous id."""
    from router.instances import Pending

    router = make_router([instance("d0", free=10, running=4), instance("d1"), instance("p0", role="prefill")])
    live = place(router, "h", "d0")
    router.instances["p0"].place(Pending(live.request_id, "h", 32))
    (found,) = router.find("h")
    assert found[0].instance_id == "d0" and found[1].request_id == live.request_id
    router.instances["p0"].place(Pending("h@9.other", "h", 32))  # another front end's "h": ambiguous
    assert len(router.find("h")) == 2
