"""MigrationCoordinator.run against fake worker actors (no Ray, no engines): every path of the
state machine, what each abort leaves behind, and the scheduler's bookkeeping afterwards (which
instance dispatch counts the request on, what it fires at the engines).

The host is the real MigrationScheduler (router/migration_scheduler.py) over a fake registry
with the real GlobalScheduler's `call_actor` and `fire`, so the coordinator and the host's
`request_left` / `moved` run unchanged. Fake actors record every `method.remote(...)` at call
time and answer through scripted handlers (which may change the registry's view mid-call to
simulate engine snapshots). The stream itself lives at a front end (tests/unit/router/
test_frontend_stream.py): here the source's stop reply carries the continuation."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import SimpleNamespace

import pytest

from cluster.config import MigrationConfig, RouterConfig
from cluster.kv.layout import blocks_for_tokens as blocks_for
from cluster.protocol import (
    EngineRequest,
    InstanceInfo,
    LiveRequest,
    LoadReport,
    Sampling,
    stage_transfer_id,
    tail_transfer_id,
)
from decode_worker.migration_adapter import RequestProgress
from decode_worker.worker import DecodeWorker
from router.instances import Instance, InstanceState
from router.migration import MigrationHost, advance, continuation_id
from router.migration_scheduler import MigrationScheduler
from router.migration_types import MigrationRecord, MigrationState
from router.scheduler import GlobalScheduler
from tests.unit.router.fakes import FakeActor

S = MigrationState
BLOCK = 4
PROMPT = tuple(range(100, 120))  # 20 prompt tokens
OUTPUT = [7, 8, 9, 10, 11]  # streamed so far
RID = "req-1"
OWNER = "fe-a"
ENGINE_ID = f"{RID}@1.abc"
MIG_ID = f"{ENGINE_ID}~m1"


# ---------------------------------------------------------------- fakes

class FakeRegistry:
    """What MigrationScheduler needs of the GlobalScheduler, with its real call helpers."""

    call_actor = GlobalScheduler.call_actor
    fire = GlobalScheduler.fire
    spawn = GlobalScheduler._spawn

    def __init__(self, instances):
        self.rc = RouterConfig(actor_call_timeout_s=5.0)
        self.instances = {i.instance_id: i for i in instances}
        self._tasks: set = set()
        self.changed: list[str] = []

    def view_changed(self, inst) -> None:
        self.changed.append(inst.instance_id)


def test_the_migration_scheduler_implements_the_coordinators_interface():
    assert isinstance(MigrationScheduler(FakeRegistry([]), MigrationConfig()), MigrationHost)


def info(iid: str) -> InstanceInfo:
    return InstanceInfo(iid, "decode", f"node-{iid}", "m", 1024, BLOCK, 100, 1000, (2,), 1)


def continuation(engine_id: str) -> EngineRequest:
    """What the source's loop builds at the stop (EngineLoop.continuation)."""
    sampling = Sampling(max_tokens=50 - len(OUTPUT), min_tokens=8 - len(OUTPUT))
    return EngineRequest(engine_id, PROMPT + tuple(OUTPUT), sampling, 0, owner=OWNER, arrival=1.0)


class SourceModel:
    """The source worker's side of the protocol, like decode_worker/worker.py computes it:
    `computed` lists num_computed_tokens seen by each successive stage; the stop sees
    `stop_computed`."""

    def __init__(self, actor: FakeActor, rec: MigrationRecord, computed: list[int], stop_computed: int,
                 preemptions: int = 0):
        self.actor, self.rec = actor, rec
        self.computed = list(computed)
        self.stop_computed = stop_computed
        self.preemptions = preemptions
        self.stage_status = ["ok"] * len(computed)
        self.stop_status = "stopped"
        self.seen_states: dict[str, list] = {"stage": [], "stop": []}
        actor.handlers.update(migrate_out_stage=self.stage, migrate_out_stop=self.stop)

    def stage(self, engine_id, migration_id, stage, from_block):
        self.seen_states["stage"].append(self.rec.state)
        if self.stage_status[stage] != "ok":
            return {"status": self.stage_status[stage]}
        computed = self.computed[stage]
        full = computed // BLOCK
        return {"status": "ok", "transfer_id": stage_transfer_id(migration_id, stage), "full_blocks": full,
                "num_blocks": len(range(from_block, full)), "num_computed_tokens": computed,
                "num_tokens": computed + 1, "preemptions": self.preemptions}

    def stop(self, engine_id, migration_id, from_block, preemptions, cont):
        self.seen_states["stop"].append(self.rec.state)
        if self.stop_status != "stopped":
            return {"status": self.stop_status}
        tail = max(0, blocks_for(self.stop_computed, BLOCK) - from_block)
        return {"status": "stopped", "transfer_id": tail_transfer_id(migration_id), "num_blocks": tail,
                "num_computed_tokens": self.stop_computed, "num_tokens": self.stop_computed + 1,
                "request": continuation(cont["request_id"])}


class DestModel:
    """The destination worker: a reservation that only grows, pulls that must land inside it."""

    def __init__(self, actor: FakeActor, rec: MigrationRecord, capacity: int = 1000):
        self.actor, self.rec = actor, rec
        self.capacity = capacity
        self.reserved = 0
        self.pulled: list[tuple[str, int, int]] = []
        self.committed: list[tuple[EngineRequest, int]] = []
        self.seen_states: dict[str, list] = {"reserve": [], "pull": [], "commit": []}
        actor.handlers.update(migrate_in_reserve=self.reserve, migrate_in_pull=self.pull,
                              migrate_in_commit=self.commit, add_request=self.add_request,
                              migrate_in_cancel=lambda migration_id: True)

    def reserve(self, migration_id, total_blocks, keep_free):
        self.seen_states["reserve"].append(self.rec.state)
        if total_blocks + keep_free > self.capacity:
            return {"status": "no_memory"}
        self.reserved = max(self.reserved, total_blocks)
        return {"status": "ok", "block_ids": list(range(self.reserved))}

    def pull(self, migration_id, source_id, source, source_node, transfer_id, first_block, num_blocks, timeout_s):
        self.seen_states["pull"].append(self.rec.state)
        assert first_block + num_blocks <= self.reserved, "pulled outside the reservation"
        self.pulled.append((transfer_id, first_block, num_blocks))
        return num_blocks * 64

    def commit(self, migration_id, request, num_tokens):
        self.seen_states["commit"].append(self.rec.state)
        assert blocks_for(num_tokens, BLOCK) <= self.reserved
        self.committed.append((request, num_tokens))

    def add_request(self, request):
        self.seen_states["commit"].append(self.rec.state)
        self.committed.append((request, 0))


def load(iid: str) -> LoadReport:
    return LoadReport(iid, 100, 80, 1, 0, 0)


class Scenario:
    def __init__(self, computed=(40, 50, 54), stop_computed=55, config=None, capacity=1000, **src_kw):
        self.config = config or MigrationConfig(timeout_s=2.0)
        self.src = Instance(info("decode-0"), FakeActor("decode-0"))
        self.dst = Instance(info("decode-1"), FakeActor("decode-1"))
        self.registry = FakeRegistry([self.src, self.dst])
        self.host = MigrationScheduler(self.registry, self.config)
        self.req = LiveRequest(ENGINE_ID, OWNER, len(PROMPT), len(OUTPUT), 0, 1.0)
        self.src.observe(load("decode-0"), [self.req], now=0.0)
        self.dst.observe(load("decode-1"), [], now=0.0)
        self.rec = MigrationRecord(MIG_ID, RID, self.src.instance_id, self.dst.instance_id)
        self.source = SourceModel(self.src.actor, self.rec, list(computed), stop_computed, **src_kw)
        self.dest = DestModel(self.dst.actor, self.rec, capacity)
        self.coordinator = self.host.coordinator

    def run(self, mode="live") -> MigrationRecord:
        async def go():
            rec = await self.coordinator.run(self.rec, self.req, self.src, self.dst, mode)
            for _ in range(3):  # let fire-and-forget calls finish
                await asyncio.sleep(0)
            return rec

        return asyncio.run(go())

    def snapshot_shows_it_gone(self, elsewhere: Instance | None = None) -> None:
        """A snapshot of the source newer than the migration lacks the request (it finished,
        or, when `elsewhere` has it under a new attempt, it was replayed there)."""
        self.src.observe(load("decode-0"), [], now=time.monotonic() + 1)
        if elsewhere is not None:
            elsewhere.observe(load(elsewhere.instance_id),
                              [dataclasses.replace(self.req, request_id=f"{RID}@2.abc")], now=0.0)

    # ---- what an abort must leave behind ----
    def assert_cancels_fired(self, src=True, dst=True):
        assert (self.dst.actor.called("migrate_in_cancel") == [(MIG_ID,)]) is dst
        assert (self.src.actor.called("migrate_out_cancel") == [(MIG_ID,)]) is src

    def assert_untouched(self):
        """The request still runs on the source, as if no migration had been tried."""
        assert RID in self.src.in_flight and ENGINE_ID in self.src.requests
        assert RID not in self.dst.in_flight and not self.dst.pending
        assert self.src.requests_served == 0
        assert not self.dest.committed
        assert "migrate_in_commit" not in self.dst.actor.methods()
        assert "add_request" not in self.dst.actor.methods()
        assert "migrate_out_done" not in self.src.actor.methods()

    def assert_moved(self):
        """Dispatch counts the request on the destination, under its continuation's id."""
        assert RID not in self.src.in_flight and ENGINE_ID not in self.src.requests
        assert RID in self.dst.in_flight and MIG_ID in self.dst.pending
        assert self.dst.pending[MIG_ID].owner == OWNER
        assert self.src.requests_served == 1


def assert_aborted(rec: MigrationRecord, key: str):
    assert rec.state == S.ABORTED
    assert rec.reason.split(":", 1)[0] == key, rec.reason
    assert rec.finished_at is not None


# ---------------------------------------------------------------- the state machine

def test_advance_legal_chain_sets_finish_time():
    rec = MigrationRecord("m", "r", "a", "b")
    assert rec.state == S.RESERVING and rec.finished_at is None
    for new in (S.PRECOPY, S.STOPPING, S.COMMITTING):
        advance(rec, new)
        assert rec.state == new and rec.finished_at is None
    advance(rec, S.COMMITTED)
    assert rec.state == S.COMMITTED and rec.finished_at is not None


LEGAL = {
    S.RESERVING: {S.PRECOPY, S.STOPPING, S.ABORTED},
    S.PRECOPY: {S.STOPPING, S.ABORTED},
    S.STOPPING: {S.COMMITTING, S.ABORTED},
    S.COMMITTING: {S.COMMITTED, S.ABORTED},
    S.COMMITTED: set(),
    S.ABORTED: set(),
}


@pytest.mark.parametrize("old", list(S))
@pytest.mark.parametrize("new", list(S))
def test_every_transition_is_legal_or_raises(old, new):
    rec = MigrationRecord("m", "r", "a", "b", state=old)
    if new in LEGAL[old]:
        advance(rec, new)
        assert rec.state == new
    else:
        with pytest.raises(RuntimeError, match="illegal transition"):
            advance(rec, new)
        assert rec.state == old and rec.finished_at is None


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# ---------------------------------------------------------------- committed migrations

def test_live_migration_commits_after_stages_shrink_below_stop_copy_blocks():
    sc = Scenario(computed=[40, 50, 54], stop_computed=55)  # 10, then 2, then 1 new full blocks
    rec = sc.run()

    assert rec.state == S.COMMITTED and rec.reason == "" and rec.finished_at is not None
    assert rec.stages == 3  # stage 2 copied 1 block <= stop_copy_blocks (1): stop there
    assert rec.blocks_copied == 10 + 2 + 1 + 1  # three stages and a 1-block tail
    assert rec.tokens_moved == 55
    # Transitions, as each worker call saw them.
    assert sc.source.seen_states["stage"] == [S.PRECOPY] * 3
    assert sc.source.seen_states["stop"] == [S.STOPPING]
    assert sc.dest.seen_states["pull"] == [S.PRECOPY] * 3 + [S.COMMITTING]
    assert sc.dest.seen_states["commit"] == [S.COMMITTING]
    # Each stage starts where the last one ended; the stop passes the first stage's preemptions
    # and where the request continues (the marker its stream ends with there).
    assert [a[2:] for a in sc.src.actor.called("migrate_out_stage")] == [(0, 0), (1, 10), (2, 12)]
    assert sc.src.actor.called("migrate_out_stop") == [
        (ENGINE_ID, MIG_ID, 13, 0, {"request_id": MIG_ID, "instance_id": "decode-1"})]
    assert continuation_id(rec) == MIG_ID
    # The reservation grows stage by stage, then covers the tail (+1) before the stop.
    assert [a[1] for a in sc.dst.actor.called("migrate_in_reserve")] == [10, 12, 13, 15, 14]
    assert all(a[2] == sc.config.reserve_watermark_blocks for a in sc.dst.actor.called("migrate_in_reserve"))
    assert sc.dest.pulled == [(f"{MIG_ID}#s0", 0, 10), (f"{MIG_ID}#s1", 10, 2), (f"{MIG_ID}#s2", 12, 1),
                              (f"{MIG_ID}#tail", 13, 1)]
    pull = sc.dst.actor.called("migrate_in_pull")[0]
    assert pull[1:4] == ("decode-0", sc.src.actor, "node-decode-0") and pull[7] == sc.config.timeout_s
    # The destination gets the source's continuation (prompt + every token, the budget left,
    # the same owner) under the continuation id, adopting the reserved KV.
    (request, num_tokens), = sc.dest.committed
    assert num_tokens == 55
    assert request == dataclasses.replace(continuation(MIG_ID), kv_transfer={"migrated_in": MIG_ID})
    sc.assert_moved()
    # The source forgets the continuation once the commit is confirmed.
    assert sc.src.actor.called("migrate_out_done") == [(MIG_ID,)]
    # The phases after the stop are timed; the first token's share comes from the front end.
    assert {"stop", "tail", "commit"} <= set(rec.phases_s)
    assert all(v >= 0 for v in rec.phases_s.values())
    # Nothing cancelled or released.
    for m in ("migrate_in_cancel", "abort"):
        assert m not in sc.dst.actor.methods()
    for m in ("migrate_out_cancel", "kv_release"):
        assert m not in sc.src.actor.methods()


def test_live_migration_stops_after_max_stages():
    cfg = MigrationConfig(timeout_s=2.0, max_stages=2, stop_copy_blocks=1)
    sc = Scenario(computed=[40, 80, 120], stop_computed=121, config=cfg)  # 10 new blocks every stage
    rec = sc.run()
    assert rec.state == S.COMMITTED and rec.stages == 2
    assert len(sc.src.actor.called("migrate_out_stage")) == 2
    assert [a[:4] for a in sc.src.actor.called("migrate_out_stop")] == [(ENGINE_ID, MIG_ID, 20, 0)]
    assert sc.dest.pulled[-1] == (f"{MIG_ID}#tail", 20, blocks_for(121, BLOCK) - 20)
    assert rec.blocks_copied == 10 + 10 + 11
    assert [a[1] for a in sc.dst.actor.called("migrate_in_reserve")] == [10, 20, 21, 31]


def test_stage_with_no_new_full_block_releases_its_view_and_stops():
    sc = Scenario(computed=[3], stop_computed=3)  # not even one full block
    rec = sc.run()
    assert rec.state == S.COMMITTED and rec.stages == 1
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#s0",)]
    assert sc.dest.pulled == [(f"{MIG_ID}#tail", 0, 1)]
    assert [a[1] for a in sc.dst.actor.called("migrate_in_reserve")] == [2, 1]  # blocks_for(3)+1, then 1
    assert rec.blocks_copied == 1 and rec.tokens_moved == 3


def test_stop_copy_mode_copies_everything_after_the_stop():
    sc = Scenario(computed=[], stop_computed=41)
    rec = sc.run("stop_copy")
    assert rec.state == S.COMMITTED and rec.stages == 0
    assert "migrate_out_stage" not in sc.src.actor.methods()
    assert sc.source.seen_states["stop"] == [S.STOPPING]  # RESERVING -> STOPPING, no PRECOPY
    (args,) = sc.src.actor.called("migrate_out_stop")
    assert args[:4] == (ENGINE_ID, MIG_ID, 0, -1)
    assert [a[1] for a in sc.dst.actor.called("migrate_in_reserve")] == [11]
    assert sc.dest.pulled == [(f"{MIG_ID}#tail", 0, 11)]
    assert rec.blocks_copied == 11 and rec.tokens_moved == 41
    (request, num_tokens), = sc.dest.committed
    assert num_tokens == 41 and request.kv_transfer == {"migrated_in": MIG_ID}
    sc.assert_moved()


def test_recompute_mode_copies_nothing_and_adds_a_plain_request():
    sc = Scenario(computed=[], stop_computed=41)
    rec = sc.run("recompute")
    assert rec.state == S.COMMITTED and rec.stages == 0
    assert rec.blocks_copied == 0 and rec.tokens_moved == 0
    assert "migrate_in_reserve" not in sc.dst.actor.methods()
    assert "migrate_in_pull" not in sc.dst.actor.methods()
    assert "migrate_in_commit" not in sc.dst.actor.methods()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#tail",)]  # the held tail is dropped
    (request, num_tokens), = sc.dest.committed
    assert num_tokens == 0 and request == continuation(MIG_ID)
    sc.assert_moved()


def test_unknown_mode_aborts_before_touching_anything():
    sc = Scenario()
    rec = sc.run("teleport")
    assert rec.state == S.ABORTED and "unknown migration mode" in rec.reason
    assert "migrate_out_stop" not in sc.src.actor.methods()
    sc.assert_untouched()


# ---------------------------------------------------------------- aborts before the stop

@pytest.mark.parametrize("status,key", [("gone", "finished"), ("finished", "finished"),
                                        ("preempted", "preempted"), ("waiting", "preempted")])
def test_request_not_running_at_a_stage_aborts_and_stays(status, key):
    sc = Scenario(computed=[40, 50, 54])
    sc.source.stage_status[1] = status
    rec = sc.run()
    assert_aborted(rec, key)
    assert rec.stages == 1 and len(sc.src.actor.called("migrate_out_stage")) == 2
    assert "migrate_out_stop" not in sc.src.actor.methods()
    sc.assert_cancels_fired()
    sc.assert_untouched()
    assert "kv_release" not in sc.src.actor.methods()  # no tail was held


@pytest.mark.parametrize("status,key", [("gone", "finished"), ("preempted", "preempted")])
def test_stop_refused_aborts_and_the_request_keeps_running(status, key):
    sc = Scenario(computed=[40, 41])
    sc.source.stop_status = status
    rec = sc.run()
    assert_aborted(rec, key)
    assert sc.source.seen_states["stop"] == [S.STOPPING]
    assert rec.tokens_moved == 0
    sc.assert_cancels_fired()
    sc.assert_untouched()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#s1",)]  # the empty stage only, no tail


def test_request_finishing_mid_precopy_aborts_at_the_next_check():
    sc = Scenario(computed=[40, 50, 54])
    original_pull = sc.dest.pull

    def pull_then_finish(*args):
        out = original_pull(*args)
        sc.snapshot_shows_it_gone()  # the source's next snapshot no longer has it
        return out

    sc.dst.actor.handlers["migrate_in_pull"] = pull_then_finish
    rec = sc.run()
    assert_aborted(rec, "finished")
    assert len(sc.src.actor.called("migrate_out_stage")) == 1
    sc.assert_cancels_fired()
    assert "migrate_out_stop" not in sc.src.actor.methods()
    assert not sc.dest.committed and not sc.dst.pending


def test_a_snapshot_older_than_the_migration_does_not_count_as_gone():
    sc = Scenario(computed=[40, 50, 54])
    sc.host._started_at[ENGINE_ID] = time.monotonic()
    sc.src.observe(load("decode-0"), [], now=sc.host._started_at[ENGINE_ID] - 1)  # taken before it began
    assert sc.host.request_left(sc.req, sc.src) is None
    sc.src.observe(load("decode-0"), [], now=sc.host._started_at[ENGINE_ID] + 1)
    assert sc.host.request_left(sc.req, sc.src) == "finished"


def test_destination_out_of_memory_at_a_stage_releases_the_view():
    sc = Scenario(computed=[40, 50], capacity=5)
    rec = sc.run()
    assert_aborted(rec, "destination_no_memory")
    assert "decode-1" in rec.reason
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#s0",)]  # the stage view
    assert "migrate_in_pull" not in sc.dst.actor.methods()
    assert "migrate_out_stop" not in sc.src.actor.methods()
    assert rec.stages == 0 and rec.blocks_copied == 0
    sc.assert_cancels_fired()  # the reservation (if any) and every view are dropped
    sc.assert_untouched()


def test_destination_out_of_memory_for_the_tail_aborts_before_the_stop():
    sc = Scenario(computed=[40, 41], capacity=11)  # 10 blocks fit, 10 + tail + 1 do not
    rec = sc.run()
    assert_aborted(rec, "destination_no_memory")
    assert rec.stages == 2 and rec.blocks_copied == 10
    assert "migrate_out_stop" not in sc.src.actor.methods()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#s1",)]  # the empty stage's view
    sc.assert_cancels_fired()
    sc.assert_untouched()


def test_destination_unsupported_aborts():
    sc = Scenario()
    sc.dst.actor.handlers["migrate_in_reserve"] = lambda *a: {"status": "unsupported", "reason": "prefix caching"}
    rec = sc.run()
    assert_aborted(rec, "unsupported")
    assert "prefix caching" in rec.reason
    sc.assert_cancels_fired()
    sc.assert_untouched()


@pytest.mark.parametrize("dst_dead", [False, True])
def test_destination_dying_before_the_stop_leaves_the_request_on_the_source(dst_dead):
    sc = Scenario(computed=[40, 50, 54])

    def pull_fails(*args):
        if dst_dead:
            sc.dst.state = InstanceState.DEAD  # the scheduler noticed
        raise RuntimeError("actor died")

    sc.dst.actor.handlers["migrate_in_pull"] = pull_fails
    rec = sc.run()
    assert_aborted(rec, "destination_failed")
    assert "RuntimeError: actor died" in rec.reason
    assert "migrate_out_stop" not in sc.src.actor.methods()
    sc.assert_cancels_fired(src=True, dst=not dst_dead)  # no call into a dead actor
    sc.assert_untouched()


def test_destination_hanging_past_the_call_deadline_aborts():
    sc = Scenario(computed=[40])
    sc.registry.rc = RouterConfig(actor_call_timeout_s=0.05)

    async def hang(*args):
        await asyncio.sleep(10)

    sc.dst.actor.handlers["migrate_in_reserve"] = hang
    rec = sc.run()
    assert_aborted(rec, "destination_failed")
    assert "TimeoutError" in rec.reason
    sc.assert_cancels_fired()
    sc.assert_untouched()


def test_source_replayed_between_stages_aborts_without_touching_the_replay():
    sc = Scenario(computed=[40, 50, 54])
    prefill = Instance(InstanceInfo("prefill-0", "prefill", "n", "m", 1024, BLOCK, 100, 1000, (2,), 1),
                       FakeActor("prefill-0"))
    sc.registry.instances["prefill-0"] = prefill
    original_pull = sc.dest.pull

    def pull_while_replayed(*args):
        out = original_pull(*args)
        sc.snapshot_shows_it_gone(elsewhere=prefill)  # its front end replayed it there
        return out

    sc.dst.actor.handlers["migrate_in_pull"] = pull_while_replayed
    rec = sc.run()
    assert_aborted(rec, "source_failed")
    assert "replayed" in rec.reason
    assert len(sc.src.actor.called("migrate_out_stage")) == 1
    sc.assert_cancels_fired()
    assert RID in prefill.in_flight and prefill.actor.methods() == []  # the replay is the front end's
    assert not sc.dest.committed and RID not in sc.dst.in_flight


def test_source_call_failing_while_source_is_dead_is_source_failed():
    sc = Scenario(computed=[40, 50, 54])
    calls = {"n": 0}
    original_stage = sc.source.stage

    def stage(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            sc.src.state = InstanceState.DEAD
            raise RuntimeError("source actor died")
        return original_stage(*args)

    sc.src.actor.handlers["migrate_out_stage"] = stage
    rec = sc.run()
    assert_aborted(rec, "source_failed")
    sc.assert_cancels_fired(src=False, dst=True)
    assert not sc.dest.committed and RID not in sc.dst.in_flight  # the front end replays it


def test_source_already_dead_is_refused_before_any_call():
    sc = Scenario()
    sc.src.state = InstanceState.DEAD
    rec = sc.run()
    assert_aborted(rec, "source_failed")
    assert sc.src.actor.methods() == []  # not even a cancel into a dead actor
    assert sc.dst.actor.methods() == ["migrate_in_cancel"]


def test_stop_reply_lost_leaves_the_continuation_to_the_clean_up():
    """The source stopped the request but its reply never came: the migration aborts as the
    source's; the stopped request shows in the source's next snapshot, and the clean-up starts
    it on the destination the marker named."""
    sc = Scenario(computed=[40, 41], stop_computed=42)

    def stop_then_reply_lost(*args):
        raise RuntimeError("reply lost")

    sc.src.actor.handlers["migrate_out_stop"] = stop_then_reply_lost
    rec = sc.run()
    assert_aborted(rec, "source_failed")
    assert not sc.dest.committed

    async def clean():
        sc.host.clean_up(sc.src, {"stopped": {MIG_ID: {"request": continuation(MIG_ID), "target": "decode-1"}}})
        sc.host.clean_up(sc.src, {"stopped": {MIG_ID: {"request": continuation(MIG_ID), "target": "decode-1"}}})
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(clean())
    assert sc.dst.actor.called("add_request") == [(continuation(MIG_ID),)]  # once, recomputed
    assert (f"{MIG_ID}#tail",) in sc.src.actor.called("kv_release")
    assert sc.src.actor.called("migrate_out_done") == [(MIG_ID,)]
    assert RID in sc.dst.in_flight and MIG_ID in sc.dst.pending


# ---------------------------------------------------------------- aborts after the stop

def test_destination_dying_after_the_stop_runs_the_request_there_or_leaves_it_to_the_front_end():
    sc = Scenario(computed=[40, 50, 54], stop_computed=55)
    original_pull = sc.dest.pull
    failed_in = []

    def tail_pull_fails(*args):
        if args[4].endswith("#tail"):
            failed_in.append(sc.rec.state)
            raise RuntimeError("transfer failed")
        return original_pull(*args)

    sc.dst.actor.handlers["migrate_in_pull"] = tail_pull_fails
    rec = sc.run()
    assert_aborted(rec, "destination_failed")
    assert failed_in == [S.COMMITTING]
    sc.assert_cancels_fired()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#tail",)]  # the source's tail hold
    assert sc.src.actor.called("migrate_out_done") == [(MIG_ID,)]
    # Its front end follows the marker to the destination: the request starts there without
    # its KV (recomputed), under the id the marker named.
    assert sc.dst.actor.called("add_request") == [(continuation(MIG_ID),)]
    assert "migrate_in_commit" not in sc.dst.actor.methods()


def test_destination_dead_after_the_stop_gets_nothing_the_front_end_replays():
    sc = Scenario(computed=[40, 50, 54], stop_computed=55)
    original_pull = sc.dest.pull

    def tail_pull_fails(*args):
        if args[4].endswith("#tail"):
            sc.dst.state = InstanceState.DEAD
            raise RuntimeError("destination died")
        return original_pull(*args)

    sc.dst.actor.handlers["migrate_in_pull"] = tail_pull_fails
    rec = sc.run()
    assert_aborted(rec, "destination_failed")
    assert "add_request" not in sc.dst.actor.methods() and "migrate_in_cancel" not in sc.dst.actor.methods()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#tail",)]


def test_destination_failing_the_commit_retries_it_as_a_recompute():
    sc = Scenario(computed=[40, 50, 54], stop_computed=55)

    def commit_fails(*args):
        raise RuntimeError("engine loop busy")

    sc.dst.actor.handlers["migrate_in_commit"] = commit_fails
    rec = sc.run()
    assert_aborted(rec, "destination_failed")
    sc.assert_cancels_fired()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#tail",)]
    # The same id again without KV: if the commit did land after all, the engine ignores the
    # repeat (an engine runs an id once).
    assert sc.dst.actor.called("add_request") == [(continuation(MIG_ID),)]
    sc.assert_moved()


def test_clean_up_cancels_leftovers_no_migration_owns():
    sc = Scenario()

    async def clean():
        sc.host.clean_up(sc.dst, {"incoming": ["old~m9"], "outgoing": [], "stopped": {}})
        sc.host.clean_up(sc.src, {"incoming": [], "outgoing": ["old~m8"], "stopped": {}})
        sc.host.clean_up(sc.dst, {"incoming": ["old~m9"]})  # again at once: not fired twice
        sc.host._migrations[MIG_ID] = sc.rec  # one in flight here is left alone
        sc.host.clean_up(sc.dst, {"incoming": [MIG_ID]})
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(clean())
    assert sc.dst.actor.called("migrate_in_cancel") == [("old~m9",)]
    assert sc.src.actor.called("migrate_out_cancel") == [("old~m8",)]


# ---------------------------------------------------------------- the worker's side of the modes

class _FakeLoop:
    def __init__(self, progress: RequestProgress):
        self.progress = progress
        self.ended: list[tuple[str, str, dict]] = []

    def call(self, fn, timeout_s):
        return fn(self)

    def internal_id(self, request_id):
        return f"{request_id}-internal"

    def end_request(self, request_id, reason, **marker):
        self.ended.append((request_id, reason, marker))

    def continuation(self, request_id, new_request_id):
        return continuation(new_request_id)


def _fake_worker(progress: RequestProgress):
    from cluster.kv.migration_ledger import MigrationLedger

    kv = SimpleNamespace(block_size=BLOCK, migrations=MigrationLedger())
    worker = SimpleNamespace(loop=_FakeLoop(progress), kv=kv, _stopped={}, _outgoing=set(),
                             _progress=lambda loop, request_id: loop.progress)
    return worker


@pytest.mark.parametrize("mode", ["stop_copy", "recompute"])
def test_worker_stops_a_running_request_for_the_modes_without_stages(mode):
    """stop_copy and recompute run no stage, so the coordinator has no preemption count to
    compare and passes -1: the worker must stop a running request then, not refuse it."""
    sc = Scenario(computed=[], stop_computed=41)
    progress = RequestProgress("running", 42, 41, 0, tuple(range(11)))
    worker = _fake_worker(progress)
    sc.src.actor.handlers["migrate_out_stop"] = lambda *args: DecodeWorker.migrate_out_stop(worker, *args)
    rec = sc.run(mode)
    assert rec.state == S.COMMITTED, rec.reason
    # The marker names where the stream continues; the continuation waits for the commit.
    assert worker.loop.ended == [(ENGINE_ID, "migrated", {"migration_id": MIG_ID, "migrated_to": "decode-1",
                                                          "continued_as": MIG_ID})]
    assert worker._stopped[MIG_ID]["request"] == continuation(MIG_ID)
    assert worker._stopped[MIG_ID]["target"] == "decode-1"


def test_worker_stop_still_refuses_a_request_preempted_since_the_stages():
    progress = RequestProgress("running", 42, 41, 1, tuple(range(11)))
    worker = _fake_worker(progress)
    assert DecodeWorker.migrate_out_stop(worker, ENGINE_ID, MIG_ID, 5, 0) == {"status": "preempted"}
    assert worker.loop.ended == []
    out = DecodeWorker.migrate_out_stop(worker, ENGINE_ID, MIG_ID, 5, 1)
    assert out == {"status": "stopped", "transfer_id": f"{MIG_ID}#tail", "num_blocks": 11 - 5,
                   "num_computed_tokens": 41, "num_tokens": 42, "request": None}
    mark = worker.kv.migrations.take_stop_mark(f"{ENGINE_ID}-internal")
    assert mark.transfer_id == f"{MIG_ID}#tail" and mark.from_block == 5


def test_worker_stop_refuses_a_waiting_request_even_without_stages():
    worker = _fake_worker(RequestProgress("preempted", 42, 0, 1, ()))
    assert DecodeWorker.migrate_out_stop(worker, ENGINE_ID, MIG_ID, 0, -1) == {"status": "preempted"}
    worker = _fake_worker(RequestProgress("finished", 42, 41, 0, ()))
    assert DecodeWorker.migrate_out_stop(worker, ENGINE_ID, MIG_ID, 0, -1) == {"status": "gone"}


def test_worker_stage_exposes_only_new_full_blocks():
    progress = RequestProgress("running", 23, 22, 0, (9, 8, 7, 6, 5, 4))  # 22 tokens: 5 full blocks
    views = []
    kv = SimpleNamespace(block_size=BLOCK, hold_view=lambda *a: views.append(a))
    worker = SimpleNamespace(loop=_FakeLoop(progress), kv=kv, _outgoing=set(),
                             _progress=lambda loop, request_id: loop.progress)
    out = DecodeWorker.migrate_out_stage(worker, ENGINE_ID, MIG_ID, 1, 2)
    assert out == {"status": "ok", "transfer_id": f"{MIG_ID}#s1", "full_blocks": 5, "num_blocks": 3,
                   "num_computed_tokens": 22, "num_tokens": 23, "preemptions": 0}
    assert views == [(f"{MIG_ID}#s1", f"{ENGINE_ID}-internal", [7, 6, 5], 20)]
    assert worker._outgoing == {MIG_ID}  # a restarted scheduler would cancel it


def test_worker_stage_of_a_request_not_running_exposes_nothing():
    views = []
    kv = SimpleNamespace(block_size=BLOCK, hold_view=lambda *a: views.append(a))
    for progress, status in ((RequestProgress("preempted", 23, 0, 1, ()), "preempted"), (None, "gone")):
        worker = SimpleNamespace(loop=_FakeLoop(progress), kv=kv, _outgoing=set(),
                                 _progress=lambda loop, request_id: loop.progress)
        assert DecodeWorker.migrate_out_stage(worker, ENGINE_ID, MIG_ID, 0, 0) == {"status": status}
        assert worker._outgoing == set()
    assert views == []
