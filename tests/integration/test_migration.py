"""Live migration between decode instances, end to end: 1 prefill + 2 decode instances (real
Ray, real vLLM CPU engines, gRPC over loopback), migrations started through the Migrate and
Drain RPCs while the client streams. Block size 32 so a few hundred tokens span many blocks
and the pre-copy stages have work to do. Automatic balancing is off: the tests decide."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from cluster.bench.recorder import StreamRecorder
from cluster.client import AsyncClient, status_to_dict
from tests.integration.support import ENGINE_ARGS, corpus_token_ids, reference_greedy, run_server, wait_idle

BLOCK = 32


@pytest.fixture(scope="module")
def migration_server(target_model):
    yield from run_server(["--prefill", "1", "--decode", "2", "--model", target_model, *ENGINE_ARGS,
                           "--block-size", str(BLOCK), "--no-migration"])


@pytest.fixture(scope="module")
def reference(reference_llm):
    """Greedy, EOS ignored (every request runs to max_tokens), on the plain engine."""
    return lambda prompts, max_tokens: reference_greedy(reference_llm, prompts, max_tokens, ignore_eos=True)


def instances(status: dict) -> dict:
    return {i["instance_id"]: i for i in status["instances"]}


def run(coro):
    return asyncio.run(coro)


def check_equal(streams, expected) -> None:
    for s, want in zip(streams, expected, strict=True):
        assert s.final is not None, f"{s.request_id} never finished"
        assert len(s.tokens) == len(want), f"{s.request_id}: {len(s.tokens)} tokens, {len(want)} expected"
        assert s.tokens == want, f"{s.request_id} diverged from the plain engine"
        assert s.final.usage.completion_tokens == len(want)


def test_migrated_once_and_twice_equal_plain_engine(migration_server, reference, tokenizer):
    prompts = [corpus_token_ids(tokenizer, n, offset=97 * i) for i, n in enumerate((150, 60, 300))]
    max_tokens = [520, 500, 420]
    expected = reference(prompts, max_tokens)

    async def scenario():
        client = AsyncClient(migration_server.address, timeout=300)
        try:
            before = instances(status_to_dict(await client.cluster_status()))
            streams = [StreamRecorder(client, p, m, request_id=f"mig-{i}")
                       for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
            # Once: request 0 after 40 tokens.
            await streams[0].reach(40)
            once = await client.migrate("mig-0")
            # Twice: request 1 to the other decode instance and back.
            await streams[1].reach(30)
            first = await client.migrate("mig-1")
            await streams[1].reach(len(streams[1].tokens) + 100)
            second = await client.migrate("mig-1")
            await asyncio.gather(*(s.task for s in streams))
            return streams, (once, first, second), before
        finally:
            await client.close()

    streams, migrations, before = run(scenario())
    check_equal(streams, expected)
    for m in migrations:
        assert m["state"] == "committed", m
        assert m["stages"] >= 1 and m["blocks_copied"] >= 1, m
        assert m["tokens_moved"] >= 30, m
        assert m["downtime_s"] is not None and m["downtime_s"] > 0
    once, first, second = migrations
    assert first["source"] == second["target"] and first["target"] == second["source"]
    # The client saw the request served by its prefill, then each decode instance in turn.
    served = list(streams[1].final.served_by)
    assert served[0] == "prefill-0" and served[1:] == [first["source"], first["target"], second["target"]]
    assert len(streams[0].final.served_by) == 3

    after = wait_idle_client(migration_server)
    stats = after["migrations"]
    assert int(stats["committed"]) >= 3
    # The KV moved: destinations computed only the few tokens the source had not (not the
    # hundreds of tokens each sequence had by then).
    grew = sum(int(after_i.get("prompt_tokens_computed", 0)) - int(before[k].get("prompt_tokens_computed", 0))
               for k, after_i in instances(after).items() if after_i["role"] == "decode")
    handoffs = len(streams)
    assert grew <= handoffs + 3 * 4, f"decode instances recomputed {grew} tokens"


def wait_idle_client(server) -> dict:
    from cluster.client import Client

    with Client(server.address, timeout=60) as c:
        status = wait_idle(c)
        for inst in status["instances"]:
            assert int(inst.get("kv_transfer", {}).get("blocks_held", 0)) == 0
        return status


def test_stop_copy_and_errors(migration_server):
    """Bad admin calls get clear statuses and change nothing."""

    async def scenario():
        client = AsyncClient(migration_server.address, timeout=60)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.migrate("no-such-request")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.drain("no-such-instance")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            s = StreamRecorder(client, list(range(5, 60)), 400, request_id="err-0")
            await s.reach(10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.migrate("err-0", "prefill-0")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.migrate("err-0", "decode-9")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await s.task
            return s
        finally:
            await client.close()

    s = run(scenario())
    assert len(s.tokens) == 400
    wait_idle_client(migration_server)


def test_concurrent_migrations_on_one_instance(migration_server, reference, tokenizer):
    """Two migrations off the same source at once: one runs, the other is refused (one
    migration per instance at a time) or runs after it; every request completes exactly."""
    prompts = [corpus_token_ids(tokenizer, 80, offset=1000 + 53 * i) for i in range(4)]
    max_tokens = [450] * 4
    expected = reference(prompts, max_tokens)

    async def scenario():
        client = AsyncClient(migration_server.address, timeout=300)
        try:
            streams = [StreamRecorder(client, p, m, request_id=f"conc-{i}")
                       for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
            for s in streams:
                await s.reach(20)
            status = status_to_dict(await client.cluster_status())
            by_source: dict[str, list[str]] = {}
            for inst in status["instances"]:
                if inst["role"] == "decode":
                    by_source[inst["instance_id"]] = []
            # Which instance each request runs on is the router's business; try pairs of all.
            results = await asyncio.gather(*(client.migrate(s.request_id) for s in streams),
                                           return_exceptions=True)
            await asyncio.gather(*(s.task for s in streams))
            return streams, results
        finally:
            await client.close()

    streams, results = run(scenario())
    check_equal(streams, expected)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    for r in refused:
        assert r.code() == grpc.StatusCode.FAILED_PRECONDITION, r
        assert "already in migration" in r.details() or "already migrating" in r.details()
    committed = [r for r in results if isinstance(r, dict) and r["state"] == "committed"]
    assert committed, results
    assert refused, "four simultaneous migrations between two instances: some must be refused"
    wait_idle_client(migration_server)


def test_drain_moves_everything_and_requests_complete(migration_server, reference, tokenizer):
    prompts = [corpus_token_ids(tokenizer, 40 + 20 * i, offset=2000 + 71 * i) for i in range(6)]
    max_tokens = [700] * 6
    expected = reference(prompts, max_tokens)

    async def scenario():
        client = AsyncClient(migration_server.address, timeout=300)
        try:
            streams = [StreamRecorder(client, p, m, request_id=f"drain-{i}")
                       for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
            for s in streams:
                await s.reach(15)
            result = await client.drain("decode-0", timeout_s=60)
            drained_at = time.monotonic()
            # The instance's load report catches up within a poll.
            for _ in range(50):
                status = instances(status_to_dict(await client.cluster_status()))
                if int(status["decode-0"].get("load", {}).get("num_running", 0)) == 0:
                    break
                await asyncio.sleep(0.1)
            await asyncio.gather(*(s.task for s in streams))
            undrained = await client.drain("decode-0", cancel=True)
            return streams, result, status, undrained, drained_at
        finally:
            await client.close()

    streams, result, status, _, drained_at = run(scenario())
    check_equal(streams, expected)
    assert result["remaining"] == 0, result
    assert result["migrated"] >= 1, result
    assert status["decode-0"]["state"] == "draining"
    assert int(status["decode-0"].get("load", {}).get("num_running", 0)) == 0
    for s in streams:
        # Each request either moved to decode-1 or finished on decode-0 before the drain
        # returned (the drain moves one request at a time); none ran on decode-0 after it.
        if list(s.final.served_by)[-1] != "decode-1":
            assert s.finished_at <= drained_at, (s.request_id, s.final.served_by)
    after = wait_idle_client(migration_server)
    assert instances(after)["decode-0"]["state"] == "ready"


def migrate_and_kill(server, request_id: str, prompt, max_tokens: int, victim: str):
    """Streams a request, starts migrating it to the other decode instance and SIGKILLs the
    `victim` ("source" or "target") a moment later. The finished StreamRecorder and migration."""

    async def scenario():
        client = AsyncClient(server.address, timeout=300)
        try:
            s = StreamRecorder(client, prompt, max_tokens, request_id=request_id)
            await s.reach(20)
            status = instances(status_to_dict(await client.cluster_status()))
            running_on = [k for k, v in status.items()
                          if v["role"] == "decode" and int(v.get("load", {}).get("num_running", 0)) > 0]
            assert len(running_on) == 1, status
            source = running_on[0]
            target = "decode-1" if source == "decode-0" else "decode-0"
            migration = asyncio.ensure_future(client.migrate(request_id, target))
            await asyncio.sleep(0.005)
            os.kill(int(status[target if victim == "target" else source]["pid"]), signal.SIGKILL)
            result = await migration
            await s.task
            return s, result
        finally:
            await client.close()

    return run(scenario())


def test_destination_dies_mid_migration(migration_server, reference, tokenizer):
    """Kill the destination while the migration runs: the request goes on (on the source, or
    replayed if the source had already stopped it) and completes exactly."""
    prompts = [corpus_token_ids(tokenizer, 200, offset=3000)]
    expected = reference(prompts, [500])
    s, result = migrate_and_kill(migration_server, "dst-dies", prompts[0], 500, victim="target")
    check_equal([s], expected)
    # Usually it aborts; if the commit won the race the request was replayed after the death.
    assert result["state"] in ("aborted", "committed"), result
    wait_respawned_and_idle(migration_server)


def test_source_dies_mid_migration(migration_server, reference, tokenizer):
    """Kill the source during pre-copy: the router replays the request; the destination's
    reservation is freed (cancelled, or expired)."""
    prompts = [corpus_token_ids(tokenizer, 250, offset=4000)]
    expected = reference(prompts, [500])
    s, result = migrate_and_kill(migration_server, "src-dies", prompts[0], 500, victim="source")
    check_equal([s], expected)
    assert result["state"] in ("aborted", "committed"), result
    wait_respawned_and_idle(migration_server)


def wait_respawned_and_idle(server) -> dict:
    from cluster.client import Client

    with Client(server.address, timeout=60) as c:
        deadline = time.monotonic() + 240
        while True:
            status = status_to_dict(c.cluster_status())
            if all(i["state"] == "ready" for i in status["instances"]):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
    return wait_idle_client(server)


@pytest.fixture(scope="module")
def no_room_server(target_model):
    """Destinations always lack memory: every reservation would leave fewer free blocks than
    this watermark."""
    yield from run_server(["--prefill", "1", "--decode", "2", "--model", target_model, *ENGINE_ARGS,
                           "--block-size", str(BLOCK), "--no-migration",
                           "--migration-reserve-watermark-blocks", "1000000"])


def test_destination_without_memory_leaves_request_untouched(no_room_server, reference, tokenizer):
    prompts = [corpus_token_ids(tokenizer, 120, offset=5000)]
    expected = reference(prompts, [300])

    async def scenario():
        client = AsyncClient(no_room_server.address, timeout=300)
        try:
            s = StreamRecorder(client, prompts[0], 300, request_id="no-room")
            await s.reach(20)
            result = await client.migrate("no-room")
            drained = await client.drain("decode-0", timeout_s=1.0)
            await client.drain("decode-0", cancel=True)
            await s.task
            return s, result, drained
        finally:
            await client.close()

    s, result, _ = run(scenario())
    assert result["state"] == "aborted" and result["reason"].startswith("destination_no_memory"), result
    check_equal([s], expected)
    assert len(s.final.served_by) == 2  # prefill, then the one decode instance it never left
    status = wait_idle_client(no_room_server)
    assert int(status["migrations"]["aborted"]) >= 1


@pytest.fixture(scope="module")
def tetris_server(target_model, demo_models):
    """The demo's decode pool: TETRIS speculative decoding with the draft model, whose KV lives
    in the same blocks as the target's and must move with it."""
    yield from run_server(["--prefill", "1", "--decode", "2", "--model", target_model, *ENGINE_ARGS,
                           "--block-size", str(BLOCK), "--no-migration",
                           "--spec-draft-model", str(demo_models / "draft"), "--spec-k", "2", "--spec-extra", "2"])


def test_migration_under_tetris_speculative_decoding(tetris_server, reference, tokenizer):
    prompts = [corpus_token_ids(tokenizer, n, offset=6000 + 37 * i) for i, n in enumerate((100, 220))]
    max_tokens = [480, 400]
    expected = reference(prompts, max_tokens)

    async def scenario():
        client = AsyncClient(tetris_server.address, timeout=300)
        try:
            streams = [StreamRecorder(client, p, m, request_id=f"spec-{i}")
                       for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
            await streams[0].reach(40)
            first = await client.migrate("spec-0")
            await streams[0].reach(len(streams[0].tokens) + 80)
            second = await client.migrate("spec-0")
            await streams[1].reach(60)
            third = await client.migrate("spec-1")
            await asyncio.gather(*(s.task for s in streams))
            return streams, (first, second, third)
        finally:
            await client.close()

    streams, migrations = run(scenario())
    check_equal(streams, expected)
    for m in migrations:
        assert m["state"] == "committed", m
    status = wait_idle_client(tetris_server)
    accepted = sum(int(i.get("spec_decode", {}).get("accepted", 0)) for i in status["instances"])
    assert accepted > 0  # speculation really ran on both sides of the migrations


@pytest.fixture(scope="module")
def balancing_server(target_model):
    """Automatic balancing on, with thresholds a burst on one instance crosses: a decode
    instance is a source below 20 free blocks per running request, a destination above 40."""
    args = list(ENGINE_ARGS)
    args[args.index("--kv-cache-gib") + 1] = "0.02"  # ~160 blocks of 32 tokens per instance
    yield from run_server(["--prefill", "1", "--decode", "2", "--model", target_model, *args,
                           "--block-size", str(BLOCK), "--migration", "--migration-interval-s", "0.1",
                           "--migrate-out-threshold", "20", "--migrate-in-threshold", "40"])


def test_balancer_moves_a_burst_off_one_instance(balancing_server, reference, tokenizer):
    """A burst lands on decode-0 (decode-1 is drained while it arrives, then rejoins, as after
    a scale-out); the freeness pairing moves requests to decode-1; all outputs stay exact."""
    prompts = [corpus_token_ids(tokenizer, 60 + 10 * i, offset=7000 + 89 * i) for i in range(8)]
    max_tokens = [360] * 8
    expected = reference(prompts, max_tokens)

    async def scenario():
        client = AsyncClient(balancing_server.address, timeout=300)
        try:
            await client.drain("decode-1", timeout_s=5)
            streams = [StreamRecorder(client, p, m, request_id=f"burst-{i}")
                       for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
            for s in streams:
                await s.reach(5)
            await client.drain("decode-1", cancel=True)
            await asyncio.gather(*(s.task for s in streams))
            return streams
        finally:
            await client.close()

    streams = run(scenario())
    check_equal(streams, expected)
    moved = [s for s in streams if list(s.final.served_by)[-1] == "decode-1"]
    assert moved, [list(s.final.served_by) for s in streams]
    status = wait_idle_client(balancing_server)
    assert int(status["migrations"]["committed"]) >= len(moved)
