"""FrontEnd against a fake scheduler and fake engine actors (no Ray, no engines): placement
through the scheduler (and on its own view while the scheduler is away), one stream per request
from its engines' token batches, a live migration's hand-over from the source's marker to the
destination (whose deltas may come first), replays after an engine dies, and leftovers of
earlier attempts that must not run on."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.config import DeploymentConfig, MigrationConfig, RouterConfig, TransferConfig
from cluster.protocol import InstanceInfo, LoadReport, Sampling, StepBatch, TokenDelta
from router.errors import RequestError
from router.frontend import FrontEnd
from router.validation import ValidatedRequest
from tests.unit.router.fakes import FakeActor

PROMPT = (5, 6, 7)


class Tok:
    """A tokenizer whose token i is the text f"<i>" (no fast backend: the plain detokenizer)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


class Engine(FakeActor):
    """An engine actor: what a test pushes with emit() comes out of poll() for its owner."""

    def __init__(self, instance_id: str, role: str = "colocated"):
        super().__init__(instance_id)
        self.info = InstanceInfo(instance_id, role, "node", "m", 1024, 16, 100, 1000, (2,), 1, pid=1)
        self.queues: dict[str, asyncio.Queue] = {}
        self.dead = False
        self.added: list = []
        self.handlers.update(poll=self._poll, add_request=self._add, add_transferred=self._add_transferred,
                             abort=lambda ids: None, kv_release=lambda tid: True)

    def queue(self, owner: str) -> asyncio.Queue:
        return self.queues.setdefault(owner, asyncio.Queue())

    def emit(self, owner: str, *deltas: TokenDelta) -> None:
        self.queue(owner).put_nowait(list(deltas))

    async def _poll(self, wait_s, owner):
        if self.dead:
            raise RuntimeError(f"{self.name} died")
        try:
            deltas = await asyncio.wait_for(self.queue(owner).get(), min(wait_s, 0.05))
        except asyncio.TimeoutError:
            deltas = []
        if self.dead:
            raise RuntimeError(f"{self.name} died")
        return StepBatch(deltas, LoadReport(self.name, 100, 90, 1, 0, 0))

    def _add(self, request):
        if self.dead:
            raise RuntimeError(f"{self.name} died")
        self.added.append(request)

    def _add_transferred(self, request, source_id, source, num_tokens, source_node):
        self._add(request)


class Scheduler(FakeActor):
    """The scheduler actor: places on the instances a test lists in `choices`, in turn."""

    def __init__(self, engines: list[Engine]):
        super().__init__("scheduler")
        self.engines = engines
        self.choices: list[str] = []
        self.down = False
        self.handlers.update(frontend_heartbeat=self._heartbeat, place=self._place, unplace=lambda *a: None,
                             report_dead=lambda *a: True, migration_resumed=lambda *a: True,
                             abort_request=lambda rid: 0)

    def _heartbeat(self, fid, info, stats, version):
        if self.down:
            raise RuntimeError("scheduler restarting")
        return {"version": 1, "incarnation": 1, "migration_metrics": "",
                "instances": [{"info": e.info, "state": "ready", "restarts": 0} for e in self.engines]}

    def _place(self, role, engine_id, num_tokens, priority, owner, exclude):
        if self.down:
            raise RuntimeError("scheduler restarting")
        return {"instance_id": self.choices.pop(0), "restarts": 0}


def make(engines: list[Engine], timeout_s: float = 5.0, push: str = "pull") -> tuple[FrontEnd, Scheduler]:
    scheduler = Scheduler(engines)
    by_id = {e.name: e for e in engines}
    fe = FrontEnd(RouterConfig(actor_call_timeout_s=2.0, poll_wait_s=0.05, instance_wait_s=0.5), scheduler, Tok(),
                  "fe-a", MigrationConfig(timeout_s=timeout_s), DeploymentConfig(heartbeat_s=0.05),
                  actor_lookup=lambda iid: by_id[iid], transfer=TransferConfig(push=push))
    return fe, scheduler


class PushDecode(Engine):
    """A decode engine that takes layer-wise pushes: reserves (or has no room), commits, cancels."""

    def __init__(self, instance_id: str, room: bool = True):
        super().__init__(instance_id, "decode")
        self.room = room
        self.handlers.update(push_reserve=self._reserve, push_commit=self._commit,
                             push_cancel=lambda tid: True)

    def _reserve(self, transfer_id, num_tokens):
        if not self.room:
            return {"status": "no_memory"}
        return {"status": "ok", "target": {"instance_id": self.name, "ranks": [], "block_ids": [7, 8]}}

    def _commit(self, transfer_id, request, num_tokens, source_id, source, timeout_s):
        self._add(request)
        return "pushed"


def request(max_tokens: int = 10, request_id: str = "r") -> ValidatedRequest:
    return ValidatedRequest(PROMPT, Sampling(max_tokens=max_tokens), (), 0, request_id)


async def collect(fe: FrontEnd, req: ValidatedRequest, script) -> list:
    """Runs the request's stream while `script(engine_id_of)` drives the engines."""
    chunks = []

    async def consume():
        async for chunk in fe.generate(req):
            chunks.append(chunk)

    task = asyncio.ensure_future(consume())
    try:
        await script()
        await asyncio.wait_for(task, 5.0)
    finally:
        task.cancel()
    return chunks


async def added(engine: Engine, n: int = 1):
    for _ in range(200):
        if len(engine.added) >= n:
            return engine.added[n - 1]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{engine.name} got no request {n}")


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_a_request_streams_from_the_engine_the_scheduler_chose():
    e0, e1 = Engine("colocated-0"), Engine("colocated-1")

    async def go():
        fe, sched = make([e0, e1])
        await fe.start()
        sched.choices = ["colocated-1"]

        async def script():
            req = await added(e1)
            assert req.owner == "fe-a" and req.prompt_token_ids == PROMPT
            e1.emit("fe-a", TokenDelta(req.request_id, [1, 2]))
            e1.emit("fe-a", TokenDelta(req.request_id, [3], True, "length"))

        chunks = await collect(fe, request(3), script)
        place = sched.called("place")[0]
        await fe.stop()
        return chunks, place

    chunks, place = asyncio.run(go())
    assert tokens(chunks) == [1, 2, 3] and "".join(c.text for c in chunks) == "<1><2><3>"
    assert chunks[-1].finished and chunks[-1].finish_reason == "length" and chunks[-1].served_by == ("colocated-1",)
    assert place[0] == "colocated" and place[2] == len(PROMPT) and place[4] == "fe-a"


def test_a_migrated_stream_continues_on_the_destination_without_loss_or_repeats():
    d0, d1 = Engine("decode-0", "decode"), Engine("decode-1", "decode")

    async def go():
        fe, sched = make([d0, d1])
        await fe.start()
        sched.choices = ["decode-0"]

        async def script():
            req = await added(d0)
            eid = req.request_id
            d0.emit("fe-a", TokenDelta(eid, [1]))
            await asyncio.sleep(0.1)
            cont = f"{eid}~m1"
            # The destination answers before the source's marker has arrived: held back.
            d1.emit("fe-a", TokenDelta(cont, [4]))
            await asyncio.sleep(0.1)
            d0.emit("fe-a", TokenDelta(eid, [2, 3], True, "migrated", migration_id=cont,
                                       migrated_to="decode-1", continued_as=cont))
            await asyncio.sleep(0.05)
            d1.emit("fe-a", TokenDelta(cont, [5], True, "length"))

        chunks = await collect(fe, request(5), script)
        resumed = sched.called("migration_resumed")
        await fe.stop()
        return chunks, resumed

    chunks, resumed = asyncio.run(go())
    assert tokens(chunks) == [1, 2, 3, 4, 5]
    assert chunks[-1].served_by == ("decode-0", "decode-1") and chunks[-1].completion_tokens == 5
    (mid, downtime, _), = resumed  # the downtime is measured where the client's stream is
    assert mid.endswith("~m1") and downtime >= 0


def test_an_engine_dying_mid_stream_replays_the_rest_elsewhere():
    e0, e1 = Engine("colocated-0"), Engine("colocated-1")

    async def go():
        fe, sched = make([e0, e1])
        await fe.start()
        sched.choices = ["colocated-0", "colocated-1"]

        async def script():
            first = await added(e0)
            e0.emit("fe-a", TokenDelta(first.request_id, [1, 2]))
            await asyncio.sleep(0.1)
            e0.dead = True
            replay = await added(e1)
            assert replay.prompt_token_ids == PROMPT + (1, 2) and replay.sampling.max_tokens == 3
            assert replay.request_id != first.request_id
            e1.emit("fe-a", TokenDelta(replay.request_id, [3, 4, 5], True, "length"))

        chunks = await collect(fe, request(5), script)
        places = sched.called("place")
        reported = sched.called("report_dead")
        await fe.stop()
        return chunks, places, reported

    chunks, places, reported = asyncio.run(go())
    assert tokens(chunks) == [1, 2, 3, 4, 5] and chunks[-1].served_by == ("colocated-0", "colocated-1")
    assert places[1][5] == ("colocated-0",)  # the replay excludes the dead instance
    assert reported and reported[0][0] == "colocated-0"


def test_a_leftover_of_an_earlier_attempt_is_aborted_not_streamed():
    e0, e1 = Engine("colocated-0"), Engine("colocated-1")

    async def go():
        fe, sched = make([e0, e1])
        await fe.start()
        sched.choices = ["colocated-0", "colocated-1"]

        async def script():
            first = await added(e0)
            e0.dead = True
            replay = await added(e1)
            # A continuation of the first attempt (a migration that raced the replay) shows up.
            e1.emit("fe-a", TokenDelta(f"{first.request_id}~m7", [9, 9]))
            await asyncio.sleep(0.1)
            e1.emit("fe-a", TokenDelta(replay.request_id, [1, 2], True, "length"))

        chunks = await collect(fe, request(2), script)
        await fe.stop()
        return chunks

    chunks = asyncio.run(go())
    assert tokens(chunks) == [1, 2]
    assert any(ids[0].endswith("~m7") for (ids,) in e1.called("abort"))


def test_a_continuation_that_never_starts_is_replayed():
    d0, d1 = Engine("decode-0", "decode"), Engine("decode-1", "decode")

    async def go():
        fe, sched = make([d0, d1], timeout_s=0.1)  # continuation deadline: 2 x 0.1 s
        await fe.start()
        sched.choices = ["decode-0", "decode-0"]

        async def script():
            req = await added(d0)
            cont = f"{req.request_id}~m1"
            d0.emit("fe-a", TokenDelta(req.request_id, [1], True, "migrated", migration_id=cont,
                                       migrated_to="decode-1", continued_as=cont))
            replay = await added(d0, 2)  # nothing came from decode-1
            assert replay.prompt_token_ids == PROMPT + (1,)
            d0.emit("fe-a", TokenDelta(replay.request_id, [2], True, "length"))

        chunks = await collect(fe, request(2), script)
        aborted = d1.called("abort")
        await fe.stop()
        return chunks, aborted

    chunks, aborted = asyncio.run(go())
    assert tokens(chunks) == [1, 2]
    assert aborted and aborted[0][0][0].endswith("~m1")  # a late start there is refused


def test_placement_goes_on_without_the_scheduler():
    e0 = Engine("colocated-0")

    async def go():
        fe, sched = make([e0])
        await fe.start()
        sched.down = True  # Ray restarts it

        async def script():
            req = await added(e0)
            e0.emit("fe-a", TokenDelta(req.request_id, [1], True, "length"))

        chunks = await collect(fe, request(1), script)
        reachable = fe.scheduler_reachable
        await fe.stop()
        return chunks, reachable

    chunks, reachable = asyncio.run(go())
    assert tokens(chunks) == [1] and not reachable


def test_abort_of_an_unknown_id_asks_the_scheduler():
    e0 = Engine("colocated-0")

    async def go():
        fe, sched = make([e0])
        await fe.start()
        with pytest.raises(RequestError) as err:
            await fe.abort("elsewhere")
        sched.handlers["abort_request"] = lambda rid: 1  # another front end's stream
        await fe.abort("elsewhere")
        calls = sched.called("abort_request")
        await fe.stop()
        return err.value, calls

    err, calls = asyncio.run(go())
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert calls == [("elsewhere",), ("elsewhere",)]


def test_deltas_of_a_finished_stream_are_stopped_at_the_engine():
    e0 = Engine("colocated-0")

    async def go():
        fe, sched = make([e0])
        await fe.start()
        e0.emit("fe-a", TokenDelta("ended@1.x", [1]))  # no stream reads it any more
        for _ in range(100):
            if e0.called("abort"):
                break
            await asyncio.sleep(0.01)
        await fe.stop()
        return e0.called("abort")

    assert asyncio.run(go()) == [(["ended@1.x"],)]


def test_metrics_scrape_has_its_own_families_and_the_schedulers_migration_ones():
    from prometheus_client import generate_latest

    from router.metrics import RouterMetrics, migration_metrics_text
    from router.migration_types import MigrationRecord, MigrationState

    scheduler_side = RouterMetrics()
    rec = MigrationRecord("m", "r", "decode-0", "decode-1", MigrationState.COMMITTED, downtime_s=0.01)
    rec.finished_at = rec.started_at + 0.2
    scheduler_side.observe_migration(rec)
    e0 = Engine("colocated-0")

    async def go():
        fe, sched = make([e0])
        original = sched.handlers["frontend_heartbeat"]
        sched.handlers["frontend_heartbeat"] = lambda *a: {**original(*a),
                                                            "migration_metrics": migration_metrics_text(scheduler_side)}
        await fe.start()
        await asyncio.sleep(0.1)  # a poll has brought the engine's load
        text = generate_latest(fe.metrics.registry).decode()
        await fe.stop()
        return text

    text = asyncio.run(go())
    assert 'disagg_migrations_total{outcome="committed",trigger="admin"} 1.0' in text
    assert 'disagg_instance_up{instance="colocated-0",role="colocated"} 1.0' in text
    assert text.count("# TYPE disagg_migrations_total counter") == 1  # one source, no duplicates


def test_a_reused_client_id_gets_a_fresh_engine_side_id():
    """An engine runs an id once: a client id used again after its request ended must not
    collide with the first request's engine-side id."""
    e0 = Engine("colocated-0")

    async def go():
        fe, sched = make([e0])
        await fe.start()
        ids = []
        for n in (1, 2):
            sched.choices = ["colocated-0"]

            async def script(n=n):
                req = await added(e0, n)
                ids.append(req.request_id)
                e0.emit("fe-a", TokenDelta(req.request_id, [n], True, "length"))

            await collect(fe, request(1, request_id="dup"), script)
        await fe.stop()
        return ids

    first, second = asyncio.run(go())
    assert first != second and first.startswith("dup@") and second.startswith("dup@")


def test_stream_interval_sends_the_steps_of_an_interval_in_one_message():
    e0 = Engine("colocated-0")

    async def go():
        fe, sched = make([e0])
        fe.config = RouterConfig(actor_call_timeout_s=2.0, poll_wait_s=0.05, instance_wait_s=0.5,
                                 stream_interval_s=0.3)
        await fe.start()
        sched.choices = ["colocated-0"]

        async def script():
            req = await added(e0)
            e0.emit("fe-a", TokenDelta(req.request_id, [1]))
            await asyncio.sleep(0.1)  # the first token goes out at once
            for t in (2, 3, 4):  # three engine steps within the interval
                e0.emit("fe-a", TokenDelta(req.request_id, [t]))
                await asyncio.sleep(0.03)
            e0.emit("fe-a", TokenDelta(req.request_id, [5], True, "length"))

        chunks = await collect(fe, request(5), script)
        await fe.stop()
        return chunks

    chunks = asyncio.run(go())
    assert [c.token_ids for c in chunks] == [[1], [2, 3, 4, 5]]
    assert chunks[-1].finished and chunks[-1].completion_tokens == 5


def _disaggregated_run(decode: PushDecode, client_aborts: bool = False):
    prefill = Engine("prefill-0", "prefill")

    async def go():
        fe, sched = make([prefill, decode], push="layerwise")
        await fe.start()
        sched.choices = ["prefill-0", "decode-0"] + ([] if decode.room else ["decode-0"])

        async def script():
            first = await added(prefill)
            if client_aborts:
                await fe.abort("r")
                return
            prefill.emit("fe-a", TokenDelta(first.request_id, [1], True, "length"))
            cont = await added(decode)
            decode.emit("fe-a", TokenDelta(cont.request_id, [2, 3], True, "length"))

        chunks = await collect(fe, request(3), script)
        await asyncio.sleep(0.1)  # fire-and-forget calls land
        await fe.stop()
        return chunks, prefill.added[0], sched

    return asyncio.run(go())


def test_layerwise_push_reserves_on_the_decode_instance_before_the_prefill_and_commits_there():
    decode = PushDecode("decode-0")
    chunks, prefill_request, sched = _disaggregated_run(decode)
    assert tokens(chunks) == [1, 2, 3] and chunks[-1].served_by == ("prefill-0", "decode-0")
    assert prefill_request.kv_transfer["push"] == {"instance_id": "decode-0", "ranks": [], "block_ids": [7, 8]}
    assert [c[0] for c in decode.called("push_reserve")] == [prefill_request.request_id]
    assert decode.called("push_commit") and not decode.called("add_transferred")
    assert [p[0] for p in sched.called("place")] == ["prefill", "decode"]  # decode chosen once, at dispatch
    assert not decode.called("push_cancel")


def test_no_room_for_a_push_falls_back_to_pulling_after_the_prefill():
    decode = PushDecode("decode-0", room=False)
    chunks, prefill_request, sched = _disaggregated_run(decode)
    assert tokens(chunks) == [1, 2, 3]
    assert "push" not in prefill_request.kv_transfer
    assert decode.called("add_transferred") and not decode.called("push_commit")


def test_a_request_that_ends_before_its_hand_off_frees_its_push_reservation():
    decode = PushDecode("decode-0")
    _, prefill_request, sched = _disaggregated_run(decode, client_aborts=True)
    assert [c[0] for c in decode.called("push_cancel")] == [prefill_request.request_id]
    assert ("decode-0", prefill_request.request_id) in [tuple(c) for c in sched.called("unplace")]
