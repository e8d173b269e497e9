"""TETRIS speculative decoding in the decode pool, through the gRPC path: lossless greedy
outputs, reproducible seeded sampling across fresh servers, counters in status/Prometheus."""

from __future__ import annotations

import urllib.request

import pytest

from cluster.client import Client
from tests.integration.support import (
    ENGINE_ARGS,
    ServerProcess,
    assert_greedy_equals_reference,
    corpus_token_ids,
    wait_idle,
)


def spec_server_args(target_model, demo_models):
    return ["--prefill", "1", "--decode", "1", "--model", target_model, *ENGINE_ARGS,
            "--spec-draft-model", str(demo_models / "draft"), "--spec-k", "2", "--spec-extra", "2"]


@pytest.fixture(scope="module")
def spec_server(target_model, demo_models):
    server = ServerProcess(spec_server_args(target_model, demo_models))
    yield server
    assert server.stop() == 0


def _seeded_run(address: str, prompts) -> list[list[int]]:
    # One request at a time: the same batches every run, so the draft's sampling sees the same
    # random stream (vLLM draws draft tokens from the engine's global generator).
    with Client(address, timeout=300) as client:
        return [client.generate(p, max_tokens=24, temperature=0.8, top_p=0.95, seed=100 + i).token_ids
                for i, p in enumerate(prompts)]


# First in the module: both runs then start from a freshly started engine.
def test_seeded_sampling_is_reproducible_across_fresh_servers(spec_server, target_model, demo_models, tokenizer):
    prompts = [corpus_token_ids(tokenizer, n, offset=11 * n) for n in (20, 150)]
    first = _seeded_run(spec_server.address, prompts)
    again = ServerProcess(spec_server_args(target_model, demo_models))
    try:
        second = _seeded_run(again.address, prompts)
    finally:
        assert again.stop() == 0
    assert first == second and all(first)


def test_greedy_with_tetris_equals_plain_engine(spec_server, reference_llm, tokenizer):
    lengths = [1, 9, 64, 128, 200, 300, 45, 500]
    prompts = [corpus_token_ids(tokenizer, n, offset=53 * i) for i, n in enumerate(lengths)]
    max_tokens = [32, 24, 40, 16, 32, 28, 40, 20]
    assert_greedy_equals_reference(spec_server.address, reference_llm, prompts, max_tokens, " under TETRIS")
    with Client(spec_server.address) as client:
        decode = next(i for i in wait_idle(client)["instances"] if i["role"] == "decode")
    spec = decode["spec_decode"]
    assert int(spec["verified"]) > 0 and int(spec["accepted"]) > 0
    assert int(spec["verified"]) <= int(spec["proposed"])
    body = urllib.request.urlopen(f"http://127.0.0.1:{spec_server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'disagg_instance_spec_draft_tokens_accepted_total{instance="decode-0",role="decode"}' in body
