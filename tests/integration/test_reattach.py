"""Engines outlive `up` on a Ray cluster it did not start: a head started with the real
`ray start` CLI, `up --address` on it, greedy requests streaming, then `up` is SIGKILLed (with
its front end). The engines keep running (same pids); a new `up` reattaches to them and serves
within 30 s, with the plain engine's tokens; an `up` with another config is refused with the
differences named; `disagg-serve down` stops the deployment for good."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from cluster.client import AsyncClient, Client, status_to_dict
from tests.deploy.test_multinode_ray_start import RayStartCluster, node_env
from tests.integration.support import (
    ENGINE_ARGS,
    REPO,
    ServerProcess,
    corpus_token_ids,
    greedy_concurrently,
    reference_greedy,
    wait_idle,
)

pytestmark = pytest.mark.timeout(1200)
NAME = "reattach-test"


@pytest.fixture(scope="module")
def ray_cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's socket paths
    cluster = RayStartCluster(temp_dir)
    try:
        cluster.start_head()
        cluster.add_node({}, num_cpus=2)  # room for the engines (the head has one CPU)
        yield cluster
    finally:
        leftovers = cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, "processes of the test's Ray nodes survived teardown:\n" + "\n".join(leftovers)


def up(cluster, target_model, *extra: str) -> ServerProcess:
    return ServerProcess(["--address", cluster.address, "--name", NAME, "--colocated", "2", "--model", target_model,
                          *ENGINE_ARGS, "--orphan-timeout", "5", *extra], env=node_env())


def engines(address: str) -> dict:
    with Client(address, timeout=60) as c:
        return {i["instance_id"]: (i["pid"], i["state"]) for i in status_to_dict(c.cluster_status())["instances"]}


def test_up_killed_then_reattached_serves_the_same_engines(ray_cluster, target_model, reference_llm, tokenizer):
    prompts = [corpus_token_ids(tokenizer, 30 + 20 * i, offset=13000 + 71 * i) for i in range(4)]
    expected = reference_greedy(reference_llm, prompts, [24] * 4)
    first = up(ray_cluster, target_model)
    try:
        got = greedy_concurrently(first.address, prompts, [24] * 4)
        assert [c.token_ids for c in got] == expected
        before = engines(first.address)
        assert {state for _, state in before.values()} == {"ready"}

        async def kill_mid_load():
            client = AsyncClient(first.address, timeout=120)
            try:
                call = client.stream(prompts[0], max_tokens=600, temperature=0.0, ignore_eos=True)
                it = call.__aiter__()
                await it.__anext__()
                os.killpg(first.proc.pid, signal.SIGKILL)  # `up` and its front end, nothing of Ray's
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in it:
                        pass
                return err.value.code()
            finally:
                await client.close()

        assert asyncio.run(asyncio.wait_for(kill_mid_load(), 120)) == grpc.StatusCode.UNAVAILABLE
    finally:
        first.kill()

    second = up(ray_cluster, target_model)
    try:
        print(f"\nreattach: serving {second.ready_s:.1f}s after the new `up` started")
        assert second.ready_s < 30.0, "reattaching took as long as a cold start"
        assert any("reattaching to deployment" in line for line in second.log_lines)
        assert engines(second.address) == before  # the same engine processes
        got = greedy_concurrently(second.address, prompts, [24] * 4)
        assert [c.token_ids for c in got] == expected
        with Client(second.address, timeout=60) as c:
            wait_idle(c, timeout_s=60)  # the killed front end's request was freed by its lease

        # Another config on the running deployment is refused, naming what differs.
        clash = subprocess.run([sys.executable, "-m", "cluster.entrypoints.cli", "up", "--address", ray_cluster.address,
                                "--name", NAME, "--colocated", "3", "--model", target_model, *ENGINE_ARGS,
                                "--port", "0"], cwd=REPO, env=node_env(), capture_output=True, text=True, timeout=300)
        assert clash.returncode == 2, clash.stderr[-2000:]
        assert "already runs on this Ray cluster with a different configuration" in clash.stderr
        assert "pools: running" in clash.stderr

        assert second.stop() == 0  # a front end leaving: the deployment stays
        assert any("keeps running" in line for line in second.log_lines)
    finally:
        second.kill()

    down = subprocess.run([sys.executable, "-m", "cluster.entrypoints.cli", "down", "--address", ray_cluster.address,
                           "--name", NAME], cwd=REPO, env=node_env(), capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "scheduler" in down.stdout and "engine colocated-0" in down.stdout and "engine colocated-1" in down.stdout
    for pid, _ in before.values():  # the engine processes are gone
        _wait_gone(pid)
    again = subprocess.run([sys.executable, "-m", "cluster.entrypoints.cli", "down", "--address", ray_cluster.address,
                            "--name", NAME], cwd=REPO, env=node_env(), capture_output=True, text=True, timeout=300)
    assert "nothing was running" in again.stdout


def _wait_gone(pid: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    raise AssertionError(f"engine process {pid} still runs after `down`")
