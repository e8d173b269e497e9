"""Instances larger than one device: tensor-parallel engines (vLLM's multiprocess executor, one
process per rank, CPU cores bound per rank) with per-rank KV transfer between pools of
different TP degrees, all with speculative decoding (TETRIS) on. Greedy outputs equal the plain
single-rank vLLM engine; a migration between two decode TP2 instances keeps them equal; a dead
rank marks its instance dead, its requests complete by replay and the instance comes back.
Prefill TP2 -> decode TP1 runs in test_kv_push.py (with layer-wise push, which re-splits the
heads layer by layer). Real Ray, real vLLM CPU engines, gRPC over loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.bench.recorder import StreamRecorder
from cluster.client import AsyncClient, Client, status_to_dict
from tests import REPO
from tests.integration.support import (
    ENGINE_ARGS,
    assert_greedy_equals_reference,
    corpus_token_ids,
    reference_greedy,
    run_server,
    wait_idle,
)

SPEC = ["--spec-k", "2", "--spec-extra", "2"]
LENGTHS = [7, 64, 150, 300]
MAX_TOKENS = [24, 32, 20, 28]


def spec_args(demo_models) -> list[str]:
    return ["--spec-draft-model", str(demo_models / "draft"), *SPEC]


def by_id(client) -> dict:
    return {i["instance_id"]: i for i in status_to_dict(client.cluster_status())["instances"]}


def prompts_of(tokenizer, salt: int) -> list[list[int]]:
    return [corpus_token_ids(tokenizer, n, offset=salt * (i + 1)) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def decode_tp2_server(target_model, demo_models):
    """1 prefill (TP1) + 2 decode (TP2 each): TP1 -> TP2 hand-offs, TP2 <-> TP2 migrations."""
    yield from run_server(["--prefill", "1", "--decode", "2", "--decode-tp", "2", "--model", target_model,
                           *ENGINE_ARGS, *spec_args(demo_models), "--no-migration"])


def test_prefill_tp1_to_decode_tp2_equals_plain_engine(decode_tp2_server, reference_llm, tokenizer):
    assert_greedy_equals_reference(decode_tp2_server.address, reference_llm, prompts_of(tokenizer, 31), MAX_TOKENS,
                                   " (prefill TP1 -> decode TP2, TETRIS)")
    with Client(decode_tp2_server.address) as client:
        insts = {i["instance_id"]: i for i in wait_idle(client)["instances"]}
    for iid in ("decode-0", "decode-1"):
        assert int(insts[iid]["tensor_parallel_size"]) == 2
        pids = [int(p) for p in insts[iid]["rank_pids"]]
        assert len(set(pids)) == 2 and int(insts[iid]["pid"]) not in pids, insts[iid]
    assert int(insts["prefill-0"]["tensor_parallel_size"]) == 1
    served = sum(int(insts[i].get("requests_served", 0)) for i in ("decode-0", "decode-1"))
    assert served >= len(LENGTHS)
    spec = [insts[i].get("spec_decode", {}) for i in ("decode-0", "decode-1")]
    assert sum(int(s.get("verified", 0)) for s in spec) > 0  # the ranks really speculated


def test_migration_between_two_decode_tp2_instances(decode_tp2_server, reference_llm, tokenizer):
    prompts = [corpus_token_ids(tokenizer, n, offset=701 * (i + 1)) for i, n in enumerate((120, 40))]
    max_tokens = [260, 240]
    expected = reference_greedy(reference_llm, prompts, max_tokens, ignore_eos=True)

    async def scenario():
        client = AsyncClient(decode_tp2_server.address, timeout=300)
        try:
            streams = [StreamRecorder(client, p, m, request_id=f"tp-mig-{i}", ignore_eos=True)
                       for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
            await streams[0].reach(30)
            there = await client.migrate("tp-mig-0")
            await streams[0].reach(len(streams[0].tokens) + 60)
            back = await client.migrate("tp-mig-0")
            await asyncio.gather(*(s.task for s in streams))
            return streams, (there, back)
        finally:
            await client.close()

    streams, migrations = asyncio.run(scenario())
    for s, want in zip(streams, expected, strict=True):
        assert s.tokens == want, f"{s.request_id} diverged from the plain engine"
    for m in migrations:
        assert m["state"] == "committed" and m["blocks_copied"] >= 1, m
    assert migrations[0]["source"] == migrations[1]["target"]
    with Client(decode_tp2_server.address) as client:
        wait_idle(client)  # no KV blocks held anywhere


def test_a_dead_rank_kills_its_instance_requests_replay_and_it_comes_back(decode_tp2_server, reference_llm,
                                                                          tokenizer):
    """Last in the module: it kills a rank of decode-0."""
    prompts = [corpus_token_ids(tokenizer, n, offset=1301 * (i + 1)) for i, n in enumerate((90, 30, 200, 60))]
    max_tokens = [200, 220, 180, 200]
    expected = reference_greedy(reference_llm, prompts, max_tokens, ignore_eos=True)
    with Client(decode_tp2_server.address) as client:
        victim = by_id(client)["decode-0"]
    rank_pid = int(victim["rank_pids"][1])
    restarts_before = int(victim.get("restarts", 0))

    async def scenario():
        client = AsyncClient(decode_tp2_server.address, timeout=300)
        try:
            streams = [StreamRecorder(client, p, m, request_id=f"tp-kill-{i}", ignore_eos=True)
                       for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
            await asyncio.gather(*(s.reach(20) for s in streams))
            os.kill(rank_pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), timeout=300)
            return streams
        finally:
            await client.close()

    streams = asyncio.run(scenario())
    for s, want in zip(streams, expected, strict=True):
        assert s.final is not None and s.tokens == want, f"{s.request_id} did not complete equal by replay"
    assert any("replaying request" in line for line in decode_tp2_server.log_lines)
    with Client(decode_tp2_server.address, timeout=60) as client:
        deadline = time.monotonic() + 240
        while True:
            now = by_id(client)["decode-0"]
            if now["state"] == "ready" and int(now.get("restarts", 0)) > restarts_before:
                break
            assert time.monotonic() < deadline, f"decode-0 did not come back: {now}"
            time.sleep(0.5)
        assert rank_pid not in [int(p) for p in now["rank_pids"]] and len(now["rank_pids"]) == 2
        wait_idle(client, timeout_s=90)  # nothing leaked
        assert client.generate(prompts[1], max_tokens=8, temperature=0.0).token_ids == expected[1][:8]


@pytest.fixture(scope="module")
def colocated_tp2_server(target_model, demo_models):
    yield from run_server(["--colocated", "1", "--colocated-tp", "2", "--model", target_model, *ENGINE_ARGS,
                           *spec_args(demo_models)])


def test_colocated_tp2_with_speculation_equals_plain_engine(colocated_tp2_server, reference_llm, tokenizer):
    assert_greedy_equals_reference(colocated_tp2_server.address, reference_llm, prompts_of(tokenizer, 59),
                                   MAX_TOKENS, " (colocated TP2, TETRIS)")
    with Client(colocated_tp2_server.address) as client:
        (inst,) = wait_idle(client)["instances"]
    assert int(inst["tensor_parallel_size"]) == 2 and int(inst["spec_decode"]["verified"]) > 0


def test_start_up_refuses_a_tp_degree_the_model_cannot_split(target_model):
    out = subprocess.run([sys.executable, "-m", "cluster.entrypoints.cli", "up", "--prefill", "1", "--decode", "1",
                          "--decode-tp", "3", "--model", target_model, *ENGINE_ARGS, "--port", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "decode pool's TP degree 3 does not divide the model's 4 attention heads" in out.stdout + out.stderr
