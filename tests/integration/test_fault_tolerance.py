"""Chaos: a few hundred greedy requests over two front ends while prefill and decode workers,
the global scheduler and one front end are killed; every request completes with the
single-engine output or ends with an explicit status; nothing is lost, nothing leaks, dead
instances come back, the scheduler is restarted. Then the only front end of a deployment dies."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import grpc
import pytest

from cluster.client import AsyncClient, Client, status_to_dict
from tests.integration.support import (
    ENGINE_ARGS,
    ServerProcess,
    corpus_token_ids,
    reference_greedy,
    run_server,
    wait_idle,
)

NUM_REQUESTS = 200


@pytest.fixture(scope="module")
def chaos_server(target_model):
    yield from run_server(["--prefill", "2", "--decode", "2", "--model", target_model, *ENGINE_ARGS,
                           "--kv-transfer-timeout", "10", "--kv-hold-timeout", "20", "--max-replays", "3",
                           "--frontends", "2", "--orphan-timeout", "10", "--frontend-timeout", "3"])


def instances(client) -> dict:
    return {i["instance_id"]: i for i in status_to_dict(client.cluster_status())["instances"]}


def test_chaos_nothing_lost_nothing_leaked(chaos_server, reference_llm, tokenizer):
    rng = random.Random(3)
    prompts = [corpus_token_ids(tokenizer, rng.randint(4, 300), offset=rng.randint(0, 20000))
               for _ in range(NUM_REQUESTS)]
    expected = reference_greedy(reference_llm, prompts, [16] * NUM_REQUESTS)
    with Client(chaos_server.address) as client:
        before = instances(client)
        scheduler_pid = int(status_to_dict(client.cluster_status())["scheduler"]["pid"])
    (_, _, _), (doomed_id, doomed_port, doomed_pid) = chaos_server.frontends
    # One request in 20 goes through the second front end, which dies too.
    via_doomed = {i for i in range(NUM_REQUESTS) if i % 20 == 19}
    victims = {"prefill-0": 1.5, "decode-1": 4.0}  # seconds after the load starts
    others = {"scheduler": (3.0, scheduler_pid), doomed_id: (6.0, doomed_pid)}
    killed_at: dict[str, float] = {}

    async def killer():
        start = time.monotonic()
        schedule = {**{name: (at, int(before[name]["pid"])) for name, at in victims.items()}, **others}
        for name, (at, pid) in sorted(schedule.items(), key=lambda kv: kv[1][0]):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            os.kill(pid, signal.SIGKILL)
            killed_at[name] = time.monotonic()

    async def one(aclients, sem, i):
        aclient = aclients[1] if i in via_doomed else aclients[0]
        async with sem:
            try:
                done = await aclient.generate(prompts[i], max_tokens=16, temperature=0.0, timeout=300)
                return ("ok", done.token_ids)
            except grpc.aio.AioRpcError as exc:
                return (exc.code().name, exc.details())

    async def run_all():
        aclients = [AsyncClient(chaos_server.address), AsyncClient(f"127.0.0.1:{doomed_port}")]
        sem = asyncio.Semaphore(24)
        try:
            kill = asyncio.create_task(killer())
            results = await asyncio.wait_for(
                asyncio.gather(*[one(aclients, sem, i) for i in range(NUM_REQUESTS)]), timeout=600)
            await kill
            return results
        finally:
            for aclient in aclients:
                await aclient.close()

    results = asyncio.run(run_all())
    assert len(results) == NUM_REQUESTS  # every accepted request ended: nothing lost, no hang
    ok = [i for i, (status, _) in enumerate(results) if status == "ok"]
    errors = {status for status, _ in results if status != "ok"}
    mismatched = [i for i in ok if results[i][1] != expected[i]]
    assert not mismatched, f"{len(mismatched)} completed requests differ from the single-engine output"
    assert errors <= {"UNAVAILABLE"}, f"unexpected statuses {errors}"
    assert len(ok) >= 0.9 * NUM_REQUESTS

    with Client(chaos_server.address) as client:
        # The dead front end shows as gone (the restarted scheduler knows the front ends its
        # predecessor knew), before the long-gone are forgotten.
        deadline = time.monotonic() + 60
        while (fronts := {f["frontend_id"]: f["state"]
                          for f in status_to_dict(client.cluster_status())["frontends"]}).get(doomed_id) != "gone":
            assert time.monotonic() < deadline, f"front end {doomed_id} not shown as gone: {fronts}"
            time.sleep(0.5)
        deadline = time.monotonic() + 300
        while True:
            now = instances(client)
            back = all(now[name]["state"] == "ready" and int(now[name].get("restarts", 0)) >= 1 for name in victims)
            if back:
                break
            assert time.monotonic() < deadline, (
                "killed instances did not come back: "
                + str({name: (now[name]["state"], now[name].get("restarts")) for name in victims}) + "\n"
                + "".join(line for line in chaos_server.log_lines[-400:]
                          if any(word in line for word in ("respawn", "adopt", "is dead", "is back", "restarted"))))
            time.sleep(0.5)
        recovered_at = time.monotonic()
        idle = wait_idle(client, timeout_s=90)  # no KV blocks leaked anywhere (the dead front end's too)
        assert int(idle["scheduler"]["restarts"]) >= 1 and int(idle["scheduler"]["pid"]) != scheduler_pid
        replays = [line for line in chaos_server.log_lines if "replaying request" in line]
        print(f"\nchaos: faults={len(victims) + len(others)} sent={NUM_REQUESTS} completed={len(ok)} "
              f"errored={NUM_REQUESTS - len(ok)} {sorted(errors)} lost=0 leaked_blocks=0 "
              f"replays={len(replays)} max_recovery_s={recovered_at - min(killed_at.values()):.1f}")
        # Still serving, on the replacements too.
        assert client.generate("x = 1\n", max_tokens=4, temperature=0.0).completion_tokens == 4


def test_router_death_gives_clients_unavailable_not_a_hang(target_model):
    server = ServerProcess(["--colocated", "1", "--model", target_model, *ENGINE_ARGS])
    try:
        async def scenario():
            aclient = AsyncClient(server.address)
            call = aclient.stream("while True:\n", max_tokens=900, temperature=0.0, ignore_eos=True)
            it = call.__aiter__()
            await it.__anext__()
            os.killpg(server.proc.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in it:
                    pass
            await aclient.close()
            return exc.value.code(), time.monotonic() - started

        code, seconds = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.kill()
