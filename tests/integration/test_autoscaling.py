"""The autoscaler end to end: `up --autoscale` with the decode pool between 1 and 2 instances
(real Ray, real vLLM CPU engines, gRPC over loopback). A burst that overflows decode-0's queue
scales the pool out; once the load falls, it scales back in, and the instance it removes is
still running requests: they live-migrate to the other instance first. Every request completes
with exactly the plain engine's greedy tokens.

The capacity profile here is synthesized with a huge capacity, so the capacity model never
asks for more instances (utilization ~0, scale-in allowed) and the queueing signal alone
scales out: the test controls both directions with the load it sends.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from cluster.bench.recorder import StreamRecorder
from cluster.client import AsyncClient, status_to_dict
from cluster.planner.profile import Overheads, ParallelProfile, Profile, StepCostModel
from tests.integration.support import ENGINE_ARGS, corpus_token_ids, reference_greedy, run_server

MAX_NUM_SEQS = 4
BURST_WAITING = 4  # burst requests kept waiting on decode-0 (pressure: more than 1 per instance)
BURST_TOKENS = 48  # short: the burst ends soon after decode-1 serves, whatever the machine's speed
MAX_BURST = 400


def _huge_capacity_profile(path) -> str:
    cost = StepCostModel(const_s=1e-4, per_prefill_token_s=1e-7, per_decode_seq_s=1e-7)
    Profile(hardware={"kind": "test"}, model={"name": "demo"}, vllm_version="test", block_size=128,
            max_num_batched_tokens=2048, max_num_seqs=MAX_NUM_SEQS, max_model_len=1024, kv_bytes_per_token=1.0,
            kv_bandwidth_bytes_per_s=1e12, parallel={1: ParallelProfile(1, 1000, cost)},
            overheads=Overheads()).save(path)
    return str(path)


@pytest.fixture(scope="module")
def autoscaling_server(target_model, tmp_path_factory):
    profile = _huge_capacity_profile(tmp_path_factory.mktemp("profile") / "huge.json")
    yield from run_server([
        "--prefill", "1", "--decode", "1", "--model", target_model, *ENGINE_ARGS,
        "--max-num-seqs", str(MAX_NUM_SEQS), "--autoscale", "--decode-min", "1", "--decode-max", "2",
        "--autoscale-profile", profile, "--autoscale-interval-s", "0.5", "--autoscale-window-s", "3",
        "--autoscale-out-after", "1", "--autoscale-in-after", "16", "--autoscale-cooldown-s", "3",
        "--autoscale-max-waiting", "1", "--no-migration"])


def _burst_prompt(tokenizer, i: int) -> list[int]:
    return corpus_token_ids(tokenizer, 48, offset=97 * i)


def _autoscaler_metrics(server) -> str:
    text = server.metrics_text()
    return "; ".join(line for line in text.splitlines() if line.startswith("disagg_autoscaler"))


@pytest.fixture(scope="module")
def reference(reference_llm):
    return lambda prompts, max_tokens: reference_greedy(reference_llm, prompts, max_tokens, ignore_eos=True)


def _decode_ids(status: dict, state: str = "ready") -> list[str]:
    return sorted(i["instance_id"] for i in status["instances"] if i["role"] == "decode" and i["state"] == state)


def _metric(server, name: str, **labels) -> float:
    text = server.metrics_text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(re.search(f'{k}="{v}"', line) for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_load_ramp_scales_decode_one_two_one_and_scale_in_migrates_first(autoscaling_server, reference,
                                                                          tokenizer):
    """The load adapts to the machine: the burst keeps requests waiting on decode-0 until
    decode-1 serves (however long its start takes), and the long tails start on both instances
    before the scale-in countdown (`--autoscale-in-after`: 8 s with no pressure) can end."""
    server = autoscaling_server
    tail = [corpus_token_ids(tokenizer, 48, offset=9000 + 300 * i) for i in range(4)]
    tail_tokens = [960] * len(tail)  # 48 + 960 <= max_model_len: runs > 8 s at any speed seen

    async def scenario():
        client = AsyncClient(server.address)
        sizes: list[int] = []
        running_at_scale_in: dict[str, int] = {}
        try:
            async def watch():
                while True:
                    status = status_to_dict(await client.cluster_status())
                    ready = _decode_ids(status)
                    if not sizes or sizes[-1] != len(ready):
                        sizes.append(len(ready))
                    for inst in status["instances"]:
                        if inst["role"] == "decode" and inst["state"] == "draining" \
                                and inst["instance_id"] not in running_at_scale_in:
                            running_at_scale_in[inst["instance_id"]] = int(inst.get("load", {}).get("num_running", 0))
                    await asyncio.sleep(0.2)

            watcher = asyncio.create_task(watch())
            # Ramp up: MAX_NUM_SEQS run on decode-0 and BURST_WAITING more wait, topped up as
            # they finish, until decode-1 serves.
            streams: list[StreamRecorder] = []
            deadline = time.monotonic() + 300
            while 2 not in sizes and time.monotonic() < deadline and len(streams) < MAX_BURST:
                in_flight = sum(1 for s in streams if not s.task.done())
                for _ in range(MAX_NUM_SEQS + BURST_WAITING - in_flight):
                    i = len(streams)
                    streams.append(StreamRecorder(client, _burst_prompt(tokenizer, i), BURST_TOKENS,
                                                  request_id=f"burst-{i}"))
                await asyncio.sleep(0.2)
            assert 2 in sizes, (f"decode pool never reached 2 instances: {sizes} after {len(streams)} burst "
                                f"requests; autoscaler: {_autoscaler_metrics(server)}")
            await asyncio.gather(*(s.task for s in streams))
            # Ramp down: long requests spread over both instances (2 + 2, nothing waits); the
            # autoscaler removes one while they run.
            tails = [StreamRecorder(client, p, m, request_id=f"tail-{i}")
                     for i, (p, m) in enumerate(zip(tail, tail_tokens, strict=True))]
            await asyncio.gather(*(s.task for s in tails))
            deadline = time.monotonic() + 120
            while sizes[-1] != 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            watcher.cancel()
            return streams, tails, sizes, running_at_scale_in
        finally:
            await client.close()

    streams, tails, sizes, running_at_scale_in = asyncio.run(scenario())
    assert sizes[:3] == [1, 2, 1], (sizes, _autoscaler_metrics(server))
    burst = [_burst_prompt(tokenizer, i) for i in range(len(streams))]
    expected = reference(burst + tail, [BURST_TOKENS] * len(burst) + tail_tokens)
    for s, want in zip(streams + tails, expected, strict=True):
        assert s.final is not None, f"{s.request_id} never finished"
        assert s.tokens == want, f"{s.request_id} diverged from the plain engine"
    assert _metric(server, "disagg_autoscaler_decisions_total", pool="decode", action="out") >= 1
    assert _metric(server, "disagg_autoscaler_decisions_total", pool="decode", action="in") >= 1
    assert _metric(server, "disagg_autoscaler_actions_total", pool="decode", action="in", outcome="removed") == 1
    # The instance removed was running requests when the drain began; they moved, none was cut.
    assert running_at_scale_in and max(running_at_scale_in.values()) >= 1, running_at_scale_in
    moved = [s for s in tails if len(s.final.served_by) >= 3]
    assert moved, [s.final.served_by for s in tails]
    assert _metric(server, "disagg_migrations_total", trigger="drain", outcome="committed") >= len(moved)
