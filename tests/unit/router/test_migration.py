"""MigrationCoordinator.run against fake worker actors (no Ray, no engines): every path of the
state machine, what each abort leaves behind, and how the request's routing state (instance,
engine attempt, in-flight sets, stream deltas) looks afterwards.

The fake router implements MigrationHost (the coordinator's whole view of the Router) with the
real Router's `call_actor`, `fire`, `remaining` and `next_attempt` on a bare object with a
RequestTable, so the coordinator runs unchanged. Fake actors record every
`method.remote(...)` at call time and answer through scripted handlers (which may change the
request's state mid-call to simulate the router or the stream)."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import pytest

from cluster.config import MigrationConfig, RouterConfig
from cluster.kv.layout import blocks_for_tokens as blocks_for
from cluster.protocol import EngineRequest, InstanceInfo, Sampling, TokenDelta, stage_transfer_id, tail_transfer_id
from decode_worker.migration_adapter import RequestProgress
from decode_worker.worker import DecodeWorker
from router.instances import Instance, InstanceState
from router.migration import MigrationCoordinator, MigrationHost, advance
from router.migration_types import MigrationRecord, MigrationState
from router.request_table import RequestState, RequestTable
from router.router import Router
from router.validation import ValidatedRequest

S = MigrationState
BLOCK = 4
PROMPT = tuple(range(100, 120))  # 20 prompt tokens
OUTPUT = [7, 8, 9, 10, 11]  # streamed so far
RID = "req-1"
ENGINE_ID = f"{RID}@1"
MIG_ID = f"{ENGINE_ID}~m1"


# ---------------------------------------------------------------- fakes

class FakeActor:
    """`actor.method.remote(*args)` records (method, args) at once and returns a coroutine
    that runs handlers[method](*args) (sync or async; may raise) when awaited."""

    def __init__(self, name: str):
        self.name = name
        self.calls: list[tuple[str, tuple]] = []
        self.handlers: dict = {}

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        actor = self

        class _Method:
            @staticmethod
            def remote(*args):
                actor.calls.append((method, args))
                handler = actor.handlers.get(method)

                async def run():
                    if handler is None:
                        return None
                    out = handler(*args)
                    if inspect.isawaitable(out):
                        out = await out
                    return out

                return run()

        return _Method()

    def called(self, method: str) -> list[tuple]:
        return [args for m, args in self.calls if m == method]

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


class FakeRouter(MigrationHost):
    """MigrationHost, the surface MigrationCoordinator uses, with the real Router's helpers."""

    call_actor = Router.call_actor
    fire = Router.fire
    remaining = Router.remaining
    next_attempt = Router.next_attempt

    def __init__(self, instances):
        self.config = RouterConfig(actor_call_timeout_s=5.0)
        self.table = RequestTable()
        self.instances = {i.instance_id: i for i in instances}


def test_the_router_and_the_fake_implement_the_coordinators_interface():
    for cls in (Router, FakeRouter):
        missing = [name for name in ("call_actor", "fire", "remaining", "next_attempt")
                   if not callable(getattr(cls, name, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"
    assert isinstance(FakeRouter([]), MigrationHost)


def info(iid: str) -> InstanceInfo:
    return InstanceInfo(iid, "decode", f"node-{iid}", "m", 1024, BLOCK, 100, 1000, (2,), 1)


class SourceModel:
    """The source worker's side of the protocol, like decode_worker/worker.py computes it:
    `computed` lists num_computed_tokens seen by each successive stage; the stop sees
    `stop_computed`."""

    def __init__(self, actor: FakeActor, state: RequestState, computed: list[int], stop_computed: int,
                 preemptions: int = 0, stream_delivers: bool = True):
        self.actor, self.state = actor, state
        self.computed = list(computed)
        self.stop_computed = stop_computed
        self.preemptions = preemptions
        self.stream_delivers = stream_delivers
        self.stage_status = ["ok"] * len(computed)
        self.stop_status = "stopped"
        self.seen_states: dict[str, list] = {"stage": [], "stop": []}
        actor.handlers.update(migrate_out_stage=self.stage, migrate_out_stop=self.stop)

    def stage(self, engine_id, migration_id, stage, from_block):
        self.seen_states["stage"].append(self.state.migration.state if self.state.migration else None)
        if self.stage_status[stage] != "ok":
            return {"status": self.stage_status[stage]}
        computed = self.computed[stage]
        full = computed // BLOCK
        return {"status": "ok", "transfer_id": stage_transfer_id(migration_id, stage), "full_blocks": full,
                "num_blocks": len(range(from_block, full)), "num_computed_tokens": computed,
                "num_tokens": computed + 1, "preemptions": self.preemptions}

    def stop(self, engine_id, migration_id, from_block, preemptions):
        self.seen_states["stop"].append(self.state.migration.state if self.state.migration else None)
        if self.stop_status != "stopped":
            return {"status": self.stop_status}
        if self.stream_delivers:  # the stream's "migrated" delta arrives after the last token
            asyncio.get_running_loop().call_soon(self.state.migration_stopped.set)
        tail = max(0, blocks_for(self.stop_computed, BLOCK) - from_block)
        return {"status": "stopped", "transfer_id": tail_transfer_id(migration_id), "num_blocks": tail,
                "num_computed_tokens": self.stop_computed, "num_tokens": self.stop_computed + 1}


class DestModel:
    """The destination worker: a reservation that only grows, pulls that must land inside it."""

    def __init__(self, actor: FakeActor, state: RequestState, capacity: int = 1000):
        self.actor, self.state = actor, state
        self.capacity = capacity
        self.reserved = 0
        self.pulled: list[tuple[str, int, int]] = []
        self.committed: list[tuple[EngineRequest, int]] = []
        self.seen_states: dict[str, list] = {"reserve": [], "pull": [], "commit": []}
        actor.handlers.update(migrate_in_reserve=self.reserve, migrate_in_pull=self.pull,
                              migrate_in_commit=self.commit, add_request=self.add_request,
                              migrate_in_cancel=lambda migration_id: True)

    def _seen(self, key):
        self.seen_states[key].append(self.state.migration.state if self.state.migration else None)

    def reserve(self, migration_id, total_blocks, keep_free):
        self._seen("reserve")
        if total_blocks + keep_free > self.capacity:
            return {"status": "no_memory"}
        self.reserved = max(self.reserved, total_blocks)
        return {"status": "ok", "block_ids": list(range(self.reserved))}

    def pull(self, migration_id, source_id, source, source_node, transfer_id, first_block, num_blocks, timeout_s):
        self._seen("pull")
        assert first_block + num_blocks <= self.reserved, "pulled outside the reservation"
        self.pulled.append((transfer_id, first_block, num_blocks))
        return num_blocks * 64

    def commit(self, migration_id, request, num_tokens):
        self._seen("commit")
        assert blocks_for(num_tokens, BLOCK) <= self.reserved
        self.committed.append((request, num_tokens))

    def add_request(self, request):
        self._seen("commit")
        self.committed.append((request, 0))


class Scenario:
    def __init__(self, computed=(40, 50, 54), stop_computed=55, config=None, capacity=1000, **src_kw):
        self.config = config or MigrationConfig(timeout_s=2.0)
        self.src = Instance(info("decode-0"), FakeActor("decode-0"))
        self.dst = Instance(info("decode-1"), FakeActor("decode-1"))
        self.router = FakeRouter([self.src, self.dst])
        request = ValidatedRequest(PROMPT, Sampling(max_tokens=50, min_tokens=8), (), 0, RID)
        self.state = RequestState(RID, request)
        self.state.phase = "decode"
        self.state.attempt = 1
        self.state.engine_request_id = ENGINE_ID
        self.state.instance_id = self.src.instance_id
        self.state.served_by = ["prefill-0", self.src.instance_id]
        self.state.output_token_ids = list(OUTPUT)
        self.router.table.add(self.state)
        self.src.in_flight.add(RID)
        self.rec = MigrationRecord(MIG_ID, RID, self.src.instance_id, self.dst.instance_id)
        self.state.migration = self.rec
        self.source = SourceModel(self.src.actor, self.state, list(computed), stop_computed, **src_kw)
        self.dest = DestModel(self.dst.actor, self.state, capacity)
        self.coordinator = MigrationCoordinator(self.router, self.config)

    def run(self, mode="live") -> MigrationRecord:
        async def go():
            rec = await self.coordinator.run(self.rec, self.state, self.src, self.dst, mode)
            for _ in range(3):  # let fire-and-forget calls finish
                await asyncio.sleep(0)
            return rec

        return asyncio.run(go())

    def deltas(self) -> list[TokenDelta]:
        out = []
        while not self.state.deltas.empty():
            out.append(self.state.deltas.get_nowait())
        return out

    # ---- what an abort must leave behind ----
    def assert_cancels_fired(self, src=True, dst=True):
        assert (self.dst.actor.called("migrate_in_cancel") == [(MIG_ID,)]) is dst
        assert (self.src.actor.called("migrate_out_cancel") == [(MIG_ID,)]) is src

    def assert_untouched(self):
        """The request still runs on the source, as if no migration had been tried."""
        assert self.state.instance_id == self.src.instance_id
        assert self.state.engine_request_id == ENGINE_ID and self.state.attempt == 1
        assert RID in self.src.in_flight and RID not in self.dst.in_flight
        assert self.src.requests_served == 0
        assert self.state.served_by == ["prefill-0", self.src.instance_id]
        assert self.state.resumed_migration is None
        assert not self.dest.committed
        assert "migrate_in_commit" not in self.dst.actor.methods()
        assert "add_request" not in self.dst.actor.methods()


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
    # Each stage starts where the last one ended; the stop passes the first stage's preemptions.
    assert [a[2:] for a in sc.src.actor.called("migrate_out_stage")] == [(0, 0), (1, 10), (2, 12)]
    assert sc.src.actor.called("migrate_out_stop") == [(ENGINE_ID, MIG_ID, 13, 0)]
    # The reservation grows stage by stage, then covers the tail (+1) before the stop.
    assert [a[1] for a in sc.dst.actor.called("migrate_in_reserve")] == [10, 12, 13, 15, 14]
    assert all(a[2] == sc.config.reserve_watermark_blocks for a in sc.dst.actor.called("migrate_in_reserve"))
    assert sc.dest.pulled == [(f"{MIG_ID}#s0", 0, 10), (f"{MIG_ID}#s1", 10, 2), (f"{MIG_ID}#s2", 12, 1),
                              (f"{MIG_ID}#tail", 13, 1)]
    pull = sc.dst.actor.called("migrate_in_pull")[0]
    assert pull[1:4] == ("decode-0", sc.src.actor, "node-decode-0") and pull[7] == sc.config.timeout_s
    # The destination gets the request as prompt + every streamed token, under a new attempt id.
    (request, num_tokens), = sc.dest.committed
    assert num_tokens == 55
    assert request.request_id == f"{RID}@2" and request.kv_transfer == {"migrated_in": MIG_ID}
    assert request.prompt_token_ids == PROMPT + tuple(OUTPUT)
    assert request.sampling.max_tokens == 50 - len(OUTPUT) and request.sampling.min_tokens == 8 - len(OUTPUT)
    # The router now takes this request's deltas from the destination only.
    assert sc.state.instance_id == "decode-1" and sc.state.engine_request_id == f"{RID}@2"
    assert sc.state.attempt == 2
    assert RID not in sc.src.in_flight and RID in sc.dst.in_flight
    assert sc.src.requests_served == 1
    assert sc.state.served_by == ["prefill-0", "decode-0", "decode-1"]
    assert sc.state.resumed_migration is rec  # the downtime is measured at its first token
    # The phases after the stop are timed; the first token's share comes with the stream.
    assert {"stop", "catch_up", "tail", "commit"} <= set(rec.phases_s)
    assert all(v >= 0 for v in rec.phases_s.values())
    assert "_t" not in rec.to_dict()["phases_s"]
    # Nothing cancelled or released, nothing pushed into the stream.
    for m in ("migrate_in_cancel", "abort"):
        assert m not in sc.dst.actor.methods()
    for m in ("migrate_out_cancel", "kv_release"):
        assert m not in sc.src.actor.methods()
    assert sc.deltas() == []


def test_live_migration_stops_after_max_stages():
    cfg = MigrationConfig(timeout_s=2.0, max_stages=2, stop_copy_blocks=1)
    sc = Scenario(computed=[40, 80, 120], stop_computed=121, config=cfg)  # 10 new blocks every stage
    rec = sc.run()
    assert rec.state == S.COMMITTED and rec.stages == 2
    assert len(sc.src.actor.called("migrate_out_stage")) == 2
    assert sc.src.actor.called("migrate_out_stop") == [(ENGINE_ID, MIG_ID, 20, 0)]
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
    assert args[:3] == (ENGINE_ID, MIG_ID, 0)
    assert [a[1] for a in sc.dst.actor.called("migrate_in_reserve")] == [11]
    assert sc.dest.pulled == [(f"{MIG_ID}#tail", 0, 11)]
    assert rec.blocks_copied == 11 and rec.tokens_moved == 41
    (request, num_tokens), = sc.dest.committed
    assert num_tokens == 41 and request.kv_transfer == {"migrated_in": MIG_ID}
    assert sc.state.instance_id == "decode-1" and RID in sc.dst.in_flight and RID not in sc.src.in_flight


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
    assert num_tokens == 0 and request.kv_transfer is None
    assert request.request_id == f"{RID}@2" and request.prompt_token_ids == PROMPT + tuple(OUTPUT)
    assert sc.state.instance_id == "decode-1" and sc.state.engine_request_id == f"{RID}@2"
    assert RID in sc.dst.in_flight and RID not in sc.src.in_flight


def test_unknown_mode_aborts_before_touching_anything():
    sc = Scenario()
    rec = sc.run("teleport")
    assert rec.state == S.ABORTED and "unknown migration mode" in rec.reason
    assert "migrate_out_stop" not in sc.src.actor.methods()
    sc.assert_untouched()
    assert sc.deltas() == []


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
    assert sc.deltas() == []  # the stream just goes on


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
    assert sc.deltas() == []


def test_request_finishing_mid_precopy_aborts_at_the_next_check():
    sc = Scenario(computed=[40, 50, 54])
    original_pull = sc.dest.pull

    def pull_then_finish(*args):
        out = original_pull(*args)
        sc.state.finished = True  # the stream saw the last token meanwhile
        return out

    sc.dst.actor.handlers["migrate_in_pull"] = pull_then_finish
    rec = sc.run()
    assert_aborted(rec, "finished")
    assert len(sc.src.actor.called("migrate_out_stage")) == 1
    sc.assert_cancels_fired()
    sc.assert_untouched()
    assert sc.deltas() == []


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
    assert sc.deltas() == []


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
            sc.dst.state = InstanceState.DEAD  # the router noticed
        raise RuntimeError("actor died")

    sc.dst.actor.handlers["migrate_in_pull"] = pull_fails
    rec = sc.run()
    assert_aborted(rec, "destination_failed")
    assert "RuntimeError: actor died" in rec.reason
    assert "migrate_out_stop" not in sc.src.actor.methods()
    sc.assert_cancels_fired(src=True, dst=not dst_dead)  # no call into a dead actor
    sc.assert_untouched()
    assert sc.deltas() == []


def test_destination_hanging_past_the_call_deadline_aborts():
    sc = Scenario(computed=[40])
    sc.router.config = RouterConfig(actor_call_timeout_s=0.05)

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
    original_pull = sc.dest.pull

    def pull_while_source_dies(*args):
        out = original_pull(*args)
        # The router saw the source die and replayed the request elsewhere.
        sc.src.state = InstanceState.DEAD
        sc.src.in_flight.discard(RID)
        sc.state.attempt, sc.state.engine_request_id = 2, f"{RID}@2"
        sc.state.instance_id = "prefill-0"
        return out

    sc.dst.actor.handlers["migrate_in_pull"] = pull_while_source_dies
    rec = sc.run()
    assert_aborted(rec, "source_failed")
    assert len(sc.src.actor.called("migrate_out_stage")) == 1
    sc.assert_cancels_fired(src=False, dst=True)
    # The replay is the router's: the coordinator changed nothing.
    assert sc.state.engine_request_id == f"{RID}@2" and sc.state.instance_id == "prefill-0"
    assert RID not in sc.dst.in_flight and not sc.dest.committed
    assert sc.deltas() == []


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
    assert not sc.dest.committed and RID not in sc.dst.in_flight
    assert sc.deltas() == []  # the router's own dead-instance path replays it


def test_source_already_dead_is_refused_before_any_call():
    sc = Scenario()
    sc.src.state = InstanceState.DEAD
    rec = sc.run()
    assert_aborted(rec, "source_failed")
    assert sc.src.actor.methods() == []  # not even a cancel into a dead actor
    assert sc.dst.actor.methods() == ["migrate_in_cancel"]


# ---------------------------------------------------------------- aborts after the stop

def test_destination_dying_after_the_stop_replays_the_request():
    sc = Scenario(computed=[40, 50, 54], stop_computed=55)
    original_pull = sc.dest.pull

    failed_in = []

    def tail_pull_fails(*args):
        if args[4].endswith("#tail"):
            failed_in.append(sc.rec.state)
            raise RuntimeError("destination died")
        return original_pull(*args)

    sc.dst.actor.handlers["migrate_in_pull"] = tail_pull_fails
    rec = sc.run()
    assert_aborted(rec, "destination_failed")
    assert failed_in == [S.COMMITTING]
    sc.assert_cancels_fired()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#tail",)]  # the source's tail hold
    # Stopped on the source, never started on the destination: the router must replay it.
    (delta,) = sc.deltas()
    assert delta.finish_reason == "dead" and delta.finished
    assert delta.request_id == sc.state.engine_request_id == ENGINE_ID  # the stream accepts it
    assert MIG_ID in delta.error and "after the stop" in delta.error
    # Still routed to the source (the replay's _leave finds it there), nothing on the destination.
    assert sc.state.instance_id == "decode-0" and RID in sc.src.in_flight and RID not in sc.dst.in_flight
    assert sc.state.resumed_migration is None and not sc.dest.committed
    assert "abort" not in sc.dst.actor.methods()


def test_destination_failing_the_commit_after_the_switch_aborts_there_and_replays():
    sc = Scenario(computed=[40, 50, 54], stop_computed=55)

    def commit_fails(*args):
        raise RuntimeError("engine loop died")

    sc.dst.actor.handlers["migrate_in_commit"] = commit_fails
    rec = sc.run()
    assert_aborted(rec, "destination_failed")
    sc.assert_cancels_fired()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#tail",)]
    # The stream was switched to the destination's attempt: abort it there, then replay.
    assert sc.state.instance_id == "decode-1" and sc.state.engine_request_id == f"{RID}@2"
    assert sc.dst.actor.called("abort") == [([f"{RID}@2"],)]
    (delta,) = sc.deltas()
    assert delta.finish_reason == "dead" and delta.request_id == f"{RID}@2"
    assert RID in sc.dst.in_flight and RID not in sc.src.in_flight  # _replay leaves the destination
    assert sc.state.resumed_migration is None


def test_stream_never_delivering_migrated_times_out_and_replays():
    cfg = MigrationConfig(timeout_s=0.2)
    sc = Scenario(computed=[40, 41], stop_computed=42, config=cfg, stream_delivers=False)
    rec = sc.run()
    assert_aborted(rec, "timeout")
    assert "never arrived" in rec.reason
    assert sc.source.seen_states["stop"] == [S.STOPPING]
    assert "migrate_in_commit" not in sc.dst.actor.methods()
    assert [p[0] for p in sc.dest.pulled] == [f"{MIG_ID}#s0"]  # the tail was never pulled
    sc.assert_cancels_fired()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#s1",), (f"{MIG_ID}#tail",)]
    (delta,) = sc.deltas()
    assert delta.finish_reason == "dead" and delta.request_id == ENGINE_ID
    assert sc.state.instance_id == "decode-0" and RID in sc.src.in_flight and RID not in sc.dst.in_flight


def test_stale_migrated_event_from_an_earlier_try_is_cleared_before_the_stop():
    cfg = MigrationConfig(timeout_s=0.2)
    sc = Scenario(computed=[40, 41], stop_computed=42, config=cfg, stream_delivers=False)
    sc.state.migration_stopped.set()  # left over from an earlier migration of this request
    rec = sc.run()
    assert_aborted(rec, "timeout")  # it waited for this stop's own "migrated" delta


@pytest.mark.parametrize("how", ["removed", "finished"])
def test_client_gone_before_the_commit_drops_everything_without_replay(how):
    sc = Scenario(computed=[40, 50, 54], stop_computed=55)
    original_pull = sc.dest.pull

    def tail_pull_then_client_leaves(*args):
        out = original_pull(*args)
        if args[4].endswith("#tail"):
            if how == "removed":  # Router._release ran: the client disconnected
                sc.router.table.remove(RID)
                sc.src.in_flight.discard(RID)
            else:
                sc.state.finished = True
        return out

    sc.dst.actor.handlers["migrate_in_pull"] = tail_pull_then_client_leaves
    rec = sc.run()
    assert_aborted(rec, "client_gone")
    sc.assert_cancels_fired()
    assert sc.src.actor.called("kv_release") == [(f"{MIG_ID}#tail",)]
    assert sc.deltas() == []  # nobody to replay for
    assert sc.state.engine_request_id == ENGINE_ID and sc.state.attempt == 1  # no new attempt
    assert sc.state.instance_id == "decode-0" and RID not in sc.dst.in_flight
    assert not sc.dest.committed


def test_source_replayed_while_waiting_for_migrated_is_not_replayed_twice():
    """After the stop the source dies before its "migrated" delta: the router's stream replays
    the request (new attempt, elsewhere). The coordinator aborts; it must not push a second
    "dead" delta for the replacement attempt (that would replay the healthy replay again and
    orphan it)."""
    sc = Scenario(computed=[40, 41], stop_computed=42, stream_delivers=False)
    original_stop = sc.source.stop

    def stop_then_source_dies(*args):
        out = original_stop(*args)

        def router_replays():
            sc.src.state = InstanceState.DEAD
            sc.src.in_flight.discard(RID)
            sc.state.attempt, sc.state.engine_request_id = 2, f"{RID}@2"
            sc.state.instance_id, sc.state.phase = "prefill-0", "prefill"

        asyncio.get_running_loop().call_later(0.01, router_replays)
        return out

    sc.src.actor.handlers["migrate_out_stop"] = stop_then_source_dies
    rec = sc.run()
    assert_aborted(rec, "source_failed")
    sc.assert_cancels_fired(src=False, dst=True)
    assert (f"{MIG_ID}#tail",) not in sc.src.actor.called("kv_release")  # the source is dead
    assert sc.deltas() == []
    assert sc.state.engine_request_id == f"{RID}@2" and sc.state.instance_id == "prefill-0"


def test_source_replayed_during_the_tail_pull_is_not_committed_on_top():
    """The source died after the "migrated" delta, and the router replayed the request while
    the destination pulled the tail: the coordinator must not then switch the request to the
    destination (that would orphan the replay's attempt and leak it in its instance's
    in_flight)."""
    sc = Scenario(computed=[40, 50, 54], stop_computed=55)
    prefill = Instance(InstanceInfo("prefill-0", "prefill", "n", "m", 1024, BLOCK, 100, 1000, (2,), 1),
                       FakeActor("prefill-0"))
    original_pull = sc.dest.pull

    def tail_pull_while_router_replays(*args):
        out = original_pull(*args)
        if args[4].endswith("#tail"):
            sc.src.state = InstanceState.DEAD
            sc.src.in_flight.discard(RID)
            sc.state.attempt, sc.state.engine_request_id = 2, f"{RID}@2"
            sc.state.instance_id, sc.state.phase = prefill.instance_id, "prefill"
            prefill.in_flight.add(RID)
        return out

    sc.dst.actor.handlers["migrate_in_pull"] = tail_pull_while_router_replays
    rec = sc.run()
    assert_aborted(rec, "source_failed")
    assert not sc.dest.committed and RID not in sc.dst.in_flight
    assert sc.state.engine_request_id == f"{RID}@2" and sc.state.instance_id == "prefill-0"
    assert RID in prefill.in_flight
    assert sc.deltas() == []


# ---------------------------------------------------------------- the worker's side of the modes

class _FakeLoop:
    def __init__(self, progress: RequestProgress):
        self.progress = progress
        self.ended: list[tuple[str, str]] = []

    def call(self, fn, timeout_s):
        return fn(self)

    def internal_id(self, request_id):
        return f"{request_id}-internal"

    def end_request(self, request_id, reason):
        self.ended.append((request_id, reason))


def _fake_worker(progress: RequestProgress):
    from cluster.kv.migration_ledger import MigrationLedger

    agent = SimpleNamespace(block_size=BLOCK, migrations=MigrationLedger())
    worker = SimpleNamespace(loop=_FakeLoop(progress), agent=agent,
                             _progress=lambda loop, request_id: loop.progress)
    return worker


@pytest.mark.parametrize("mode", ["stop_copy", "recompute"])
def test_worker_stops_a_running_request_for_the_modes_without_stages(mode):
    """stop_copy and recompute run no stage, so the coordinator has no preemption count to
    compare and passes -1: the worker must stop a running request then, not refuse it."""
    sc = Scenario(computed=[], stop_computed=41)
    progress = RequestProgress("running", 42, 41, 0, tuple(range(11)))
    worker = _fake_worker(progress)
    sc.src.actor.handlers["migrate_out_stop"] = (
        lambda *args: _set_and_return(sc.state, DecodeWorker.migrate_out_stop(worker, *args)))
    rec = sc.run(mode)
    assert rec.state == S.COMMITTED, rec.reason
    assert worker.loop.ended == [(ENGINE_ID, "migrated")]


def _set_and_return(state, out):
    if out.get("status") == "stopped":
        asyncio.get_running_loop().call_soon(state.migration_stopped.set)
    return out


def test_worker_stop_still_refuses_a_request_preempted_since_the_stages():
    progress = RequestProgress("running", 42, 41, 1, tuple(range(11)))
    worker = _fake_worker(progress)
    assert DecodeWorker.migrate_out_stop(worker, ENGINE_ID, MIG_ID, 5, 0) == {"status": "preempted"}
    assert worker.loop.ended == []
    out = DecodeWorker.migrate_out_stop(worker, ENGINE_ID, MIG_ID, 5, 1)
    assert out == {"status": "stopped", "transfer_id": f"{MIG_ID}#tail", "num_blocks": 11 - 5,
                   "num_computed_tokens": 41, "num_tokens": 42}
    mark = worker.agent.migrations.take_stop_mark(f"{ENGINE_ID}-internal")
    assert mark.transfer_id == f"{MIG_ID}#tail" and mark.from_block == 5


def test_worker_stop_refuses_a_waiting_request_even_without_stages():
    worker = _fake_worker(RequestProgress("preempted", 42, 0, 1, ()))
    assert DecodeWorker.migrate_out_stop(worker, ENGINE_ID, MIG_ID, 0, -1) == {"status": "preempted"}
    worker = _fake_worker(RequestProgress("finished", 42, 41, 0, ()))
    assert DecodeWorker.migrate_out_stop(worker, ENGINE_ID, MIG_ID, 0, -1) == {"status": "gone"}


def test_worker_stage_exposes_only_new_full_blocks():
    progress = RequestProgress("running", 23, 22, 0, (9, 8, 7, 6, 5, 4))  # 22 tokens: 5 full blocks
    views, warmed = [], []
    agent = SimpleNamespace(block_size=BLOCK, hold_view=lambda *a: views.append(a),
                            warm_exports=lambda **kw: warmed.append(kw))
    worker = SimpleNamespace(loop=_FakeLoop(progress), agent=agent,
                             _progress=lambda loop, request_id: loop.progress)
    out = DecodeWorker.migrate_out_stage(worker, ENGINE_ID, MIG_ID, 1, 2)
    assert out == {"status": "ok", "transfer_id": f"{MIG_ID}#s1", "full_blocks": 5, "num_blocks": 3,
                   "num_computed_tokens": 22, "num_tokens": 23, "preemptions": 0}
    assert views == [(f"{MIG_ID}#s1", f"{ENGINE_ID}-internal", [7, 6, 5], 20)]
    assert len(warmed) == 1  # a spare export segment is readied for the tail


def test_worker_stage_of_a_request_not_running_exposes_nothing():
    views, warmed = [], []
    agent = SimpleNamespace(block_size=BLOCK, hold_view=lambda *a: views.append(a),
                            warm_exports=lambda **kw: warmed.append(kw))
    for progress, status in ((RequestProgress("preempted", 23, 0, 1, ()), "preempted"), (None, "gone")):
        worker = SimpleNamespace(loop=_FakeLoop(progress), agent=agent,
                                 _progress=lambda loop, request_id: loop.progress)
        assert DecodeWorker.migrate_out_stage(worker, ENGINE_ID, MIG_ID, 0, 0) == {"status": status}
    assert views == [] and warmed == []
