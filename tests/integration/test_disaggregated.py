"""Disaggregated serving through gRPC: 1 prefill + 1 decode instance, KV over the CPU transport."""

from __future__ import annotations

import asyncio
import random

import grpc

from cluster.client import AsyncClient, status_to_dict
from tests.integration.support import (
    MAX_MODEL_LEN,
    assert_greedy_equals_reference,
    corpus_token_ids,
    wait_idle,
)


def by_role(status: dict) -> dict:
    return {i["role"]: i for i in status["instances"]}


def test_greedy_equals_plain_vllm_and_decode_computes_no_prompt(disagg_client, reference_llm, tokenizer):
    client = disagg_client
    before = by_role(wait_idle(client))
    block = client.model_info().block_size
    lengths = [1, block, 2 * block + 44, MAX_MODEL_LEN - 8, 17, 3 * block, 250, 5]
    prompts = [corpus_token_ids(tokenizer, n, offset=131 * i) for i, n in enumerate(lengths)]
    max_tokens = [min(40, MAX_MODEL_LEN - n) for n in lengths]
    got = assert_greedy_equals_reference(client.address, reference_llm, prompts, max_tokens)
    for completion in got:
        assert completion.served_by == ["prefill-0", "decode-0"]
    after = by_role(wait_idle(client))

    def grew(role, key):
        return int(after[role].get(key, 0)) - int(before[role].get(key, 0))

    handed_off = sum(1 for c in got if len(c.token_ids) > 1)
    assert grew("prefill", "prompt_tokens_computed") == sum(lengths)
    # Per hand-off the decode instance computes exactly one token's KV: the prefill's first token.
    assert grew("decode", "prompt_tokens_computed") == handed_off
    kv_before, kv_after = before["decode"].get("kv_transfer", {}), after["decode"]["kv_transfer"]
    assert int(kv_after["transfers_in"]) - int(kv_before.get("transfers_in", 0)) == handed_off
    assert int(kv_after["bytes_received"]) > int(kv_before.get("bytes_received", 0))
    assert int(kv_after.get("failures", 0)) == int(kv_before.get("failures", 0))


def test_single_token_requests_stay_on_prefill(disagg_client):
    done = disagg_client.generate("import ", max_tokens=1, temperature=0.0)
    assert done.served_by == ["prefill-0"] and done.completion_tokens == 1


def test_no_leaks_after_200_requests_with_aborts(disagg_client):
    client = disagg_client
    idle = wait_idle(client)
    rng = random.Random(7)

    async def one(aclient, i):
        kind = i % 4  # 0: complete, 1: cancel before the first token, 2: right after it, 3: mid-decode
        call = aclient.stream(f"def handler_{i}(request):\n" * rng.randint(1, 40), max_tokens=24,
                              temperature=0.0, ignore_eos=True)
        if kind == 1:
            await asyncio.sleep(rng.random() * 0.01)
            call.cancel()
            return "cancelled"
        seen = 0
        try:
            async for msg in call:
                seen += len(msg.token_ids)
                if (kind == 2 and seen >= 1) or (kind == 3 and seen >= 6):
                    call.cancel()
                    return "cancelled"
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return "cancelled"
            raise
        return seen

    async def run_all():
        aclient = AsyncClient(client.address)
        sem = asyncio.Semaphore(16)

        async def bounded(i):
            async with sem:
                return await one(aclient, i)

        try:
            return await asyncio.gather(*[bounded(i) for i in range(200)])
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    completed = [r for r in results if r != "cancelled"]
    assert len(completed) >= 50 and all(r == 24 for r in completed)
    after = wait_idle(client, timeout_s=60)
    for inst_before, inst_after in zip(idle["instances"], after["instances"], strict=True):
        assert inst_after["load"]["num_free_blocks"] == inst_before["load"]["num_free_blocks"]
        assert int(inst_after.get("kv_transfer", {}).get("blocks_held", 0)) == 0
    # Still serving.
    assert client.generate("x = 1\n", max_tokens=4, temperature=0.0).completion_tokens == 4


def test_status_reports_pools(disagg_client):
    status = status_to_dict(disagg_client.cluster_status())
    assert status["mode"] == "disaggregated"
    assert sorted(i["role"] for i in status["instances"]) == ["decode", "prefill"]
