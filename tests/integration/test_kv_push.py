"""Layer-wise push (Splitwise, `--kv-push layerwise`) from a prefill of TP2 to a decode of TP1
(the tensor-parallel issue's "prefill TP2 -> decode TP1" case): the decode instance is chosen at dispatch
and reserves the prompt's blocks; the prefill pushes each layer's KV into them while it computes
it; the hand-off only waits for the last layer. Greedy outputs equal the plain engine (with
speculative decoding on the decode side), the KV really moved by push, and an instance killed
while pushes are in flight ends every request (replayed, equal) with no block held anywhere.
With one instance per pool, the requests of a killed instance wait for its replacement
(`--instance-wait`). Real Ray, real vLLM CPU engines, gRPC over loopback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest

from cluster.client import AsyncClient, Client, status_to_dict
from tests.integration.support import (
    ENGINE_ARGS,
    assert_greedy_equals_reference,
    corpus_token_ids,
    reference_greedy,
    run_server,
    wait_idle,
)


@pytest.fixture(scope="module")
def push_server(target_model, demo_models):
    """1 prefill of TP2 + 1 decode of TP1: every push also re-splits the KV heads between the
    prefill's two ranks and the decode's one (a prefill TP2 -> decode TP1 deployment)."""
    yield from run_server(["--prefill", "1", "--prefill-tp", "2", "--decode", "1", "--model", target_model,
                           *ENGINE_ARGS, "--kv-push", "layerwise", "--instance-wait", "400",
                           "--spec-draft-model", str(demo_models / "draft"), "--spec-k", "2", "--spec-extra", "1"])


def handoffs(server) -> dict[str, float]:
    text = server.metrics_text()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^disagg_kv_handoffs_total\{mode="([a-z_]+)"\} ([0-9.e+]+)$', text, re.M)}


def by_id(client) -> dict:
    return {i["instance_id"]: i for i in status_to_dict(client.cluster_status())["instances"]}


def test_prefill_tp2_pushed_layer_by_layer_to_decode_tp1_equals_plain_engine(push_server, reference_llm, tokenizer):
    lengths = [3, 40, 130, 257, 600, 900]
    prompts = [corpus_token_ids(tokenizer, n, offset=211 * (i + 1)) for i, n in enumerate(lengths)]
    max_tokens = [16, 24, 20, 12, 16, 10]
    before = handoffs(push_server).get("pushed", 0.0)
    got = assert_greedy_equals_reference(push_server.address, reference_llm, prompts, max_tokens,
                                         " (layer-wise push, prefill TP2 -> decode TP1, TETRIS)")
    assert all(list(c.served_by) == ["prefill-0", "decode-0"] for c in got)
    counts = handoffs(push_server)
    assert counts.get("pushed", 0.0) - before == len(lengths), counts  # no fallback to pulling
    with Client(push_server.address) as client:
        insts = {i["instance_id"]: i for i in wait_idle(client)["instances"]}  # no block held or reserved
    assert int(insts["prefill-0"]["tensor_parallel_size"]) == 2 and len(insts["prefill-0"]["rank_pids"]) == 2
    # The decode instance computed only each request's last prompt token, the rest was pushed.
    assert int(insts["decode-0"].get("prompt_tokens_computed", 0)) <= 2 * len(lengths)
    assert float(insts["decode-0"]["kv_transfer"].get("bytes_received", 0)) > 0


@pytest.mark.parametrize("victim", ["prefill-0", "decode-0"])
def test_an_instance_killed_during_pushes_loses_nothing_and_leaks_nothing(push_server, reference_llm, tokenizer,
                                                                          victim):
    prompts = [corpus_token_ids(tokenizer, n, offset=977 * (i + 3)) for i, n in enumerate((700, 500, 900, 300, 800))]
    max_tokens = [12] * len(prompts)
    expected = reference_greedy(reference_llm, prompts, max_tokens)
    with Client(push_server.address) as client:
        pid = int(by_id(client)[victim]["pid"])

    async def scenario():
        client = AsyncClient(push_server.address, timeout=300)
        try:
            calls = [asyncio.ensure_future(client.generate(p, max_tokens=m, temperature=0.0))
                     for p, m in zip(prompts, max_tokens, strict=True)]
            await asyncio.sleep(0.3)  # the prefills (and their pushes) are under way
            os.kill(pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=400)
        finally:
            await client.close()

    results = asyncio.run(scenario())
    with Client(push_server.address, timeout=60) as client:
        deadline = time.monotonic() + 300
        while by_id(client)[victim]["state"] != "ready":
            assert time.monotonic() < deadline, f"{victim} did not come back"
            time.sleep(0.5)
        wait_idle(client, timeout_s=120)  # no KV block held or reserved anywhere
    # Every request waited for the replacement and completed, equal to the plain engine.
    errors = [f"{r.code().name}: {r.details()}" for r in results if isinstance(r, Exception)]
    assert not errors, errors
    for result, want in zip(results, expected, strict=True):
        assert result.token_ids == want
    assert_greedy_equals_reference(push_server.address, reference_llm, prompts[:2], [8, 8], " after the kill")
