"""A deployment with two front ends and a restartable global scheduler (real Ray, real vLLM
CPU engines, gRPC over loopback): 1 prefill + 2 decode instances, `up --frontends 2` (each front
end on its own port here, so the test can pick one).

- The scheduler actor is SIGKILLed while both front ends stream and migrations run: Ray
  restarts it; every stream completes with the plain engine's tokens; the migrations it was
  running end (committed or aborted) and leave no KV held; a new request is placed by the
  restarted scheduler.
- One front end is SIGKILLed mid-load: its clients see UNAVAILABLE; the other front end's
  streams complete exactly; the engines' per-front-end leases free the dead front end's KV.

Both tests share one server (module fixture); they run in this order."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from cluster.bench.recorder import StreamRecorder
from cluster.client import AsyncClient, Client, status_to_dict
from tests.integration.support import ENGINE_ARGS, corpus_token_ids, reference_greedy, run_server, wait_idle

BLOCK = 32
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def two_frontends(target_model):
    yield from run_server(["--prefill", "1", "--decode", "2", "--frontends", "2", "--model", target_model,
                           *ENGINE_ARGS, "--block-size", str(BLOCK), "--no-migration", "--orphan-timeout", "5",
                           "--frontend-timeout", "3", "--migration-timeout-s", "10"])


@pytest.fixture(scope="module")
def reference(reference_llm):
    return lambda prompts, max_tokens: reference_greedy(reference_llm, prompts, max_tokens, ignore_eos=True)


def addresses(server) -> list[str]:
    assert len(server.frontends) == 2, server.frontends
    return [f"127.0.0.1:{port}" for _, port, _ in server.frontends]


def status(address: str) -> dict:
    with Client(address, timeout=60) as c:
        return status_to_dict(c.cluster_status())


def check_equal(streams, expected) -> None:
    for s, want in zip(streams, expected, strict=True):
        assert s.final is not None, f"{s!r} never finished"
        assert s.tokens == want, f"{s.request_id} diverged from the plain engine"


def test_scheduler_killed_mid_load_is_restarted_and_nothing_is_lost(two_frontends, reference, tokenizer):
    a, b = addresses(two_frontends)
    before = status(a)
    sched_pid = int(before["scheduler"]["pid"])
    assert int(before["scheduler"].get("restarts", 0)) == 0
    assert {f["frontend_id"] for f in before["frontends"]} == {fid for fid, _, _ in two_frontends.frontends}
    prompts = [corpus_token_ids(tokenizer, 40 + 25 * i, offset=8000 + 61 * i) for i in range(6)]
    max_tokens = [300] * 6
    expected = reference(prompts, max_tokens)

    async def scenario():
        clients = [AsyncClient(a, timeout=300), AsyncClient(b, timeout=300)]
        try:
            streams = [StreamRecorder(clients[i % 2], p, m, request_id=f"sk-{i}")
                       for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
            for s in streams:
                await s.reach(10)
            # Migrations in flight when the scheduler dies (each front end asks for one).
            migrations = [asyncio.ensure_future(clients[i % 2].migrate(f"sk-{i}")) for i in (0, 1)]
            await asyncio.sleep(0.02)
            os.kill(sched_pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*migrations, return_exceptions=True)
            await asyncio.gather(*(s.task for s in streams))
            return streams, outcomes
        finally:
            for c in clients:
                await c.close()

    streams, outcomes = asyncio.run(scenario())
    check_equal(streams, expected)
    for out in outcomes:  # committed or aborted before the kill, cut off by it, or refused (one
        if isinstance(out, grpc.aio.AioRpcError):  # migration per instance at a time)
            assert out.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), out
        else:
            assert out["state"] in ("committed", "aborted"), out

    deadline = time.monotonic() + 120
    while True:  # Ray restarts the actor; front ends reach it again
        after = status(a)
        if after["scheduler"].get("state", "serving") == "serving" and int(after["scheduler"].get("pid", 0)) not in (
                0, sched_pid):
            break
        assert time.monotonic() < deadline, after["scheduler"]
        time.sleep(0.5)
    assert int(after["scheduler"]["restarts"]) == 1
    # The restarted scheduler places a new request (its view rebuilt from the engines).
    with Client(b, timeout=120) as c:
        done = c.generate(prompts[0], max_tokens=20, temperature=0.0, ignore_eos=True)
        assert done.token_ids == expected[0][:20]
        # No reservation, stage view or tail hold of the dead scheduler's migrations is left.
        idle = wait_idle(c, timeout_s=90)
    assert all(int(i.get("kv_transfer", {}).get("blocks_held", 0)) == 0 for i in idle["instances"])
    print(f"\nscheduler kill: migrations {[o if isinstance(o, dict) and o.get('state') else o for o in outcomes]}")


def test_a_dead_front_end_loses_only_its_own_streams(two_frontends, reference, tokenizer):
    (a_id, a_port, _), (b_id, b_port, b_pid) = two_frontends.frontends
    a, b = f"127.0.0.1:{a_port}", f"127.0.0.1:{b_port}"
    prompts = [corpus_token_ids(tokenizer, 50 + 20 * i, offset=11000 + 53 * i) for i in range(8)]
    max_tokens = [400] * 8
    expected = reference(prompts, max_tokens)

    async def scenario():
        ca, cb = AsyncClient(a, timeout=300), AsyncClient(b, timeout=300)
        try:
            mine = [StreamRecorder(ca, p, m, request_id=f"fa-{i}")
                    for i, (p, m) in enumerate(zip(prompts[:4], max_tokens[:4], strict=True))]
            theirs = [StreamRecorder(cb, p, m, request_id=f"fb-{i}")
                      for i, (p, m) in enumerate(zip(prompts[4:], max_tokens[4:], strict=True))]
            for s in mine + theirs:
                await s.reach(10)
            os.kill(b_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.gather(*(s.task for s in mine + theirs))
            return mine, theirs, killed_at
        finally:
            await ca.close()
            await cb.close()

    mine, theirs, killed_at = asyncio.run(scenario())
    check_equal(mine, expected[:4])
    for s in theirs:
        assert s.final is None and s.record.status == "UNAVAILABLE", s
    with Client(a, timeout=60) as c:
        idle = wait_idle(c, timeout_s=90)  # the engines freed the dead front end's requests
        freed_after = time.monotonic() - killed_at
        fronts = {f["frontend_id"]: f for f in status_to_dict(c.cluster_status())["frontends"]}
        assert c.generate(prompts[0], max_tokens=8, temperature=0.0, ignore_eos=True).token_ids == expected[0][:8]
    assert all(int(i["load"]["num_running"]) == 0 for i in idle["instances"])
    assert fronts[b_id]["state"] == "gone" and fronts[a_id]["state"] == "serving"
    print(f"\nfront-end kill: {len(theirs)} streams UNAVAILABLE, {len(mine)} exact, KV of the dead front end "
          f"freed {freed_after:.1f}s after the kill")
