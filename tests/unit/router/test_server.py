"""The Migrate / Drain RPCs and GetClusterStatus, against a fake front end (the protocol itself
is the scheduler's; here: validation, error mapping, conversion, auth)."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest

from cluster.client import AsyncClient, Client
from proto import disagg_pb2 as pb
from router.errors import RequestError
from router.migration_types import DrainResult, MigrationRecord, MigrationState, MigrationStats
from router.server import DisaggServeServicer, _Unparsable, migration_to_proto, start_grpc_server
from router.validation import Limits

NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def finished(request_id="req-1", target="decode-1", state=MigrationState.COMMITTED, reason="",
             downtime=0.003, trigger="admin") -> MigrationRecord:
    rec = MigrationRecord(f"mig-{request_id}", request_id, "decode-0", target, state, reason, trigger,
                          stages=2, blocks_copied=9, tokens_moved=130, downtime_s=downtime)
    rec.finished_at = rec.started_at + 0.25
    return rec


class FakeRouter:
    """The FrontEnd surface the servicer uses; records calls, raises what a test sets."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.error: RequestError | None = None
        self.result: MigrationRecord | None = None
        self.drain_result: DrainResult | None = None
        self.gate: asyncio.Event | None = None  # when set, migrate waits for it
        self.finished_migrations = 0
        self.stats = MigrationStats()
        self.in_flight: list[MigrationRecord] = []
        self.table: dict = {}
        self.requests_total = 0
        self.started_at = time.time()
        self.disaggregated = True
        self.instances: dict = {}
        self.frontends: list = []

    async def migrate(self, request_id: str, target: str | None = None, trigger: str = "admin"):
        self.calls.append(("migrate", request_id, target, trigger))
        if self.error:
            raise self.error
        if self.gate is not None:
            await self.gate.wait()
        self.finished_migrations += 1
        return self.result or finished(request_id, target or "decode-1", trigger=trigger)

    async def drain(self, instance_id: str, timeout_s: float | None = None):
        self.calls.append(("drain", instance_id, timeout_s))
        if self.error:
            raise self.error
        return self.drain_result or DrainResult(instance_id)

    async def undrain(self, instance_id: str) -> None:
        self.calls.append(("undrain", instance_id))
        if self.error:
            raise self.error

    async def cluster_status(self) -> dict:
        return {"requests_in_flight": len(self.table), "requests_total": self.requests_total,
                "uptime_s": time.time() - self.started_at, "mode": "disaggregated",
                "migrations": self.stats.snapshot(self.in_flight), "instances": [], "frontends": self.frontends,
                "scheduler": {"uptime_s": 12.0, "restarts": 2}, "deployment": "dep", "frontend_id": "fe-a"}


class Aborted(Exception):
    pass


class Context:
    def __init__(self):
        self.code = None
        self.message = None

    def set_trailing_metadata(self, metadata):
        pass

    async def abort(self, code, message):
        self.code, self.message = code, message
        raise Aborted(message)


def servicer(router: FakeRouter) -> DisaggServeServicer:
    limits = Limits(max_model_len=64, vocab_size=100, default_max_tokens=16, max_prompt_tokens=63)
    return DisaggServeServicer(router, "fake-model", limits, 16, [2], 1)


def call(router: FakeRouter, method: str, request):
    """(response, None) or (None, context) when the call aborted."""
    ctx = Context()

    async def go():
        return await getattr(servicer(router), method)(request, ctx)

    try:
        return asyncio.run(go()), None
    except Aborted:
        return None, ctx


# --- Migrate ------------------------------------------------------------------------------

def test_migrate_lets_the_router_pick_when_no_target():
    router = FakeRouter()
    resp, _ = call(router, "Migrate", pb.MigrateRequest(request_id="req-1"))
    assert router.calls == [("migrate", "req-1", None, "admin")]
    m = resp.migration
    assert (m.request_id, m.source, m.target, m.state, m.trigger) == (
        "req-1", "decode-0", "decode-1", "committed", "admin")
    assert (m.stages, m.blocks_copied, m.tokens_moved) == (2, 9, 130)
    assert m.HasField("downtime_s") and m.downtime_s == 0.003
    assert abs(m.duration_s - 0.25) < 1e-9


def test_migrate_passes_the_target():
    router = FakeRouter()
    resp, _ = call(router, "Migrate", pb.MigrateRequest(request_id="req-1", target_instance="decode-3"))
    assert router.calls == [("migrate", "req-1", "decode-3", "admin")]
    assert resp.migration.target == "decode-3"


def test_an_aborted_migration_is_a_normal_answer():
    router = FakeRouter()
    router.result = finished(state=MigrationState.ABORTED, reason="target_full: 3 blocks short", downtime=None)
    resp, ctx = call(router, "Migrate", pb.MigrateRequest(request_id="req-1"))
    assert ctx is None
    assert resp.migration.state == "aborted" and resp.migration.reason == "target_full: 3 blocks short"
    assert not resp.migration.HasField("downtime_s")


@pytest.mark.parametrize("request_", [pb.MigrateRequest(), pb.MigrateRequest(target_instance="decode-1"),
                                      _Unparsable(ValueError("bad utf-8"))])
def test_migrate_rejects_bad_input_before_the_router(request_):
    router = FakeRouter()
    _, ctx = call(router, "Migrate", request_)
    assert ctx.code == INVALID and router.calls == []


@pytest.mark.parametrize("code", [NOT_FOUND, PRECONDITION])
def test_migrate_maps_router_errors(code):
    router = FakeRouter()
    router.error = RequestError(code, "request req-9 is not decoding")
    _, ctx = call(router, "Migrate", pb.MigrateRequest(request_id="req-9"))
    assert ctx.code == code and ctx.message == "request req-9 is not decoding"


def test_a_caller_that_leaves_does_not_cancel_the_migration():
    router = FakeRouter()

    async def go():
        router.gate = asyncio.Event()
        task = asyncio.ensure_future(servicer(router).Migrate(pb.MigrateRequest(request_id="r"), Context()))
        await asyncio.sleep(0.01)
        task.cancel()  # what gRPC does when the client's deadline passes or it disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        router.gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        return router.finished_migrations

    assert asyncio.run(go()) == 1


# --- Drain --------------------------------------------------------------------------------

def test_drain_zero_timeout_takes_the_server_default():
    router = FakeRouter()
    router.drain_result = DrainResult("decode-0", migrated=2, remaining=1, failed=1, migrations=[
        finished("a", trigger="drain"), finished("b", state=MigrationState.ABORTED, reason="timeout: x",
                                                 downtime=None, trigger="drain")])
    resp, _ = call(router, "Drain", pb.DrainRequest(instance_id="decode-0"))
    assert router.calls == [("drain", "decode-0", None)]
    assert (resp.instance_id, resp.migrated, resp.remaining, resp.failed) == ("decode-0", 2, 1, 1)
    assert [m.request_id for m in resp.migrations] == ["a", "b"]
    assert [m.trigger for m in resp.migrations] == ["drain", "drain"]
    assert resp.migrations[1].state == "aborted"


def test_drain_passes_its_timeout():
    router = FakeRouter()
    call(router, "Drain", pb.DrainRequest(instance_id="decode-0", timeout_s=2.5))
    assert router.calls == [("drain", "decode-0", 2.5)]


def test_cancel_undrains():
    router = FakeRouter()
    resp, _ = call(router, "Drain", pb.DrainRequest(instance_id="decode-0", cancel=True))
    assert router.calls == [("undrain", "decode-0")]
    assert resp.instance_id == "decode-0" and resp.migrated == resp.remaining == 0


@pytest.mark.parametrize("request_", [
    pb.DrainRequest(),
    pb.DrainRequest(cancel=True),
    pb.DrainRequest(instance_id="decode-0", timeout_s=-1.0),
    pb.DrainRequest(instance_id="decode-0", timeout_s=math.nan),
    pb.DrainRequest(instance_id="decode-0", timeout_s=math.inf),
    _Unparsable(ValueError("truncated")),
])
def test_drain_rejects_bad_input_before_the_router(request_):
    router = FakeRouter()
    _, ctx = call(router, "Drain", request_)
    assert ctx.code == INVALID and router.calls == []


@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("code", [NOT_FOUND, PRECONDITION])
def test_drain_maps_router_errors(code, cancel):
    router = FakeRouter()
    router.error = RequestError(code, "prefill-0 is not a decode instance")
    _, ctx = call(router, "Drain", pb.DrainRequest(instance_id="prefill-0", cancel=cancel))
    assert ctx.code == code and "not a decode instance" in ctx.message


# --- status -------------------------------------------------------------------------------

def test_cluster_status_carries_the_migration_stats():
    router = FakeRouter()
    router.stats.started = 3
    router.stats.record(finished(downtime=0.002))
    router.stats.record(finished(state=MigrationState.ABORTED, reason="source_dead: gone"))
    router.in_flight = [MigrationRecord("m9", "req-9", "decode-1", "decode-0", MigrationState.PRECOPY,
                                        trigger="balance", stages=1)]
    status, _ = call(router, "GetClusterStatus", pb.GetClusterStatusRequest())
    m = status.migrations
    assert (m.started, m.committed, m.aborted, m.blocks_copied) == (3, 1, 1, 9)
    assert dict(m.aborted_by_reason) == {"source_dead": 1}
    assert m.downtime_p50_s == m.downtime_max_s == m.downtime_last_s == 0.002
    assert [(i.request_id, i.state, i.trigger) for i in m.in_flight] == [("req-9", "precopy", "balance")]
    assert not m.in_flight[0].HasField("downtime_s")


def test_cluster_status_carries_front_ends_and_the_scheduler():
    router = FakeRouter()
    router.frontends = [
        {"frontend_id": "fe-a", "address": "10.0.0.1:50051", "pid": 11, "node_id": "n1", "state": "serving",
         "requests_in_flight": 3, "requests_total": 40, "uptime_s": 9.5, "last_seen_s": 0.0},
        {"frontend_id": "fe-b", "address": "10.0.0.2:50051", "pid": 12, "node_id": "n2", "state": "gone",
         "requests_in_flight": 1, "requests_total": 7, "uptime_s": 99.0, "last_seen_s": 31.0}]
    status, _ = call(router, "GetClusterStatus", pb.GetClusterStatusRequest())
    assert [(f.frontend_id, f.state, f.requests_in_flight, f.requests_total, f.pid) for f in status.frontends] == [
        ("fe-a", "serving", 3, 40, 11), ("fe-b", "gone", 1, 7, 12)]
    assert status.frontends[1].last_seen_s == 31.0 and status.frontends[0].address == "10.0.0.1:50051"
    assert (status.scheduler.restarts, status.scheduler.uptime_s, status.scheduler.state) == (2, 12.0, "serving")
    assert status.deployment == "dep" and status.frontend_id == "fe-a"


def test_the_proto_has_every_field_of_a_record_and_a_snapshot():
    """The servicer drops keys the proto lacks; this keeps the two in step."""
    assert set(pb.MigrationInfo.DESCRIPTOR.fields_by_name) == set(finished().to_dict())
    assert set(pb.MigrationStats.DESCRIPTOR.fields_by_name) == set(MigrationStats().snapshot([]))
    assert migration_to_proto(finished().to_dict()) == migration_to_proto(finished())


# --- over a real gRPC server (handlers registered, auth applied, clients) ---------------

async def _serve(router: FakeRouter, token: str | None = None):
    return await start_grpc_server(servicer(router), "127.0.0.1", 0, auth_token=token)


def test_clients_over_grpc():
    router = FakeRouter()

    async def go():
        server, port = await _serve(router)
        address = f"127.0.0.1:{port}"
        try:
            client = AsyncClient(address, timeout=10)
            m = await client.migrate("req-1", "decode-2")
            d = await client.drain("decode-0", timeout_s=5)
            u = await client.drain("decode-0", cancel=True)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.migrate("")
            assert err.value.code() == INVALID
            await client.close()

            def blocking():
                with Client(address, timeout=10) as c:
                    return c.migrate("req-2"), c.drain("decode-1")

            return m, d, u, *await asyncio.to_thread(blocking)
        finally:
            await server.stop(None)

    m, d, u, m2, d2 = asyncio.run(go())
    assert m["request_id"] == "req-1" and m["target"] == "decode-2" and m["state"] == "committed"
    assert m["downtime_s"] == 0.003 and m["blocks_copied"] == 9 and isinstance(m["blocks_copied"], int)
    assert set(m) == set(finished().to_dict())
    assert d == {"instance_id": "decode-0", "migrated": 0, "remaining": 0, "failed": 0, "migrations": []}
    assert u["instance_id"] == "decode-0"
    assert m2["request_id"] == "req-2" and d2["instance_id"] == "decode-1"
    assert router.calls == [("migrate", "req-1", "decode-2", "admin"), ("drain", "decode-0", 5.0),
                            ("undrain", "decode-0"), ("migrate", "req-2", None, "admin"),
                            ("drain", "decode-1", None)]


def test_admin_calls_need_the_bearer_token():
    router = FakeRouter()

    async def go():
        server, port = await _serve(router, token="s3cret")
        address = f"127.0.0.1:{port}"
        codes = []
        try:
            anonymous = AsyncClient(address, timeout=10)
            for rpc in (anonymous.migrate("req-1"), anonymous.drain("decode-0"),
                        anonymous.drain("decode-0", cancel=True)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc
                codes.append(err.value.code())
            await anonymous.close()
            authorized = AsyncClient(address, timeout=10, auth_token="s3cret")
            ok = await authorized.migrate("req-1")
            await authorized.close()
            return codes, ok
        finally:
            await server.stop(None)

    codes, ok = asyncio.run(go())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert ok["state"] == "committed"
    assert router.calls == [("migrate", "req-1", None, "admin")]


def test_malformed_bytes_get_invalid_argument():
    router = FakeRouter()

    async def go():
        server, port = await _serve(router)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                codes = []
                for method in ("Migrate", "Drain"):
                    rpc = channel.unary_unary(f"/disagg.v1.DisaggServe/{method}")
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await rpc(b"\x0a\x02\xff\xfe", timeout=10)  # field 1: invalid UTF-8
                    codes.append(err.value.code())
                return codes
        finally:
            await server.stop(None)

    assert asyncio.run(go()) == [INVALID, INVALID]
    assert router.calls == []


def test_status_proto_carries_each_instance_and_its_load():
    from cluster.protocol import InstanceInfo, LoadReport
    from router.server import status_to_proto

    info = InstanceInfo("decode-0", "decode", "node-1", "m", 1024, 16, 100, 1000, (2,), 1, pid=4242)
    load = LoadReport("decode-0", 100, 60, 3, 1, 17, tokens_generated=900, prompt_tokens_computed=12,
                      kv={"bytes_received": 1024, "blocks_held": 2}, spec={"accepted": 5, "acceptance_rate": 0.5})
    status = status_to_proto({"instances": [{"info": info, "state": "draining", "load": load, "requests_served": 7,
                                             "death_reason": "", "restarts": 1}], "mode": "disaggregated"}, "m")
    (entry,) = status.instances
    assert (entry.instance_id, entry.role, entry.state, entry.pid, entry.restarts, entry.requests_served) == (
        "decode-0", "decode", "draining", 4242, 1, 7)
    assert (entry.load.num_free_blocks, entry.load.num_running, entry.load.queued_prompt_tokens) == (60, 3, 17)
    assert entry.kv_transfer.blocks_held == 2 and entry.spec_decode.accepted == 5
    assert entry.tokens_generated == 900 and status.mode == "disaggregated"


def test_status_proto_carries_prefix_cache_and_routing():
    from cluster.protocol import InstanceInfo, LoadReport
    from router.server import status_to_proto

    info = InstanceInfo("prefill-0", "prefill", "node-1", "m", 1024, 16, 100, 1000, (2,), 1)
    load = LoadReport("prefill-0", 100, 100, 0, 0, 0,
                      prefix={"query_tokens": 400, "hit_tokens_device": 100, "cached_blocks": 12})
    status = status_to_proto({"instances": [{"info": info, "state": "ready", "load": load}],
                              "routing": {"policy": "prefix", "sessions": 2,
                                          "decisions": {"prefill": {"session": 4, "load": 1}},
                                          "expected_cached_tokens": {"prefill": 96}}}, "m")
    cache = status.instances[0].prefix_cache
    assert (cache.query_tokens, cache.hit_tokens_device, cache.hit_rate, cache.cached_blocks) == (400, 100, 0.25, 12)
    assert dict(status.routing.decisions) == {"prefill/session": 4, "prefill/load": 1}
    assert status.routing.policy == "prefix" and status.routing.sessions == 2
    assert dict(status.routing.expected_cached_tokens) == {"prefill": 96}
