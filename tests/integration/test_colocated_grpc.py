"""The colocated baseline through the real gRPC path: equality, concurrency, cancellation,
bad input, health/reflection, metrics, CLI."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import grpc
import pytest

from cluster.client import AsyncClient, status_to_dict
from tests.integration.support import (
    MAX_MODEL_LEN,
    REPO,
    assert_greedy_equals_reference,
    corpus_token_ids,
    reference_greedy,
    wait_idle,
)


def test_greedy_equals_plain_vllm(client, reference_llm, tokenizer):
    block = client.model_info().block_size
    lengths = [1, block, 2 * block + 44, MAX_MODEL_LEN - 8, 17, 3 * block]
    prompts = [corpus_token_ids(tokenizer, n, offset=97 * i) for i, n in enumerate(lengths)]
    max_tokens = [min(48, MAX_MODEL_LEN - n) for n in lengths]
    got = assert_greedy_equals_reference(client.address, reference_llm, prompts, max_tokens)
    for n, completion in zip(lengths, got, strict=True):
        assert completion.prompt_tokens == n and completion.completion_tokens == len(completion.token_ids)
        assert completion.finish_reason in ("length", "stop")
    # Both instances took part: outputs do not depend on where a request ran.
    assert {c.served_by[0] for c in got} == {"colocated-0", "colocated-1"}
    wait_idle(client)


def test_text_prompt_and_streamed_text(client, reference_llm, tokenizer):
    prompt = "def parse_args(self, args=None, namespace=None):\n"
    ids = tokenizer.encode(prompt)
    want = reference_greedy(reference_llm, [ids], [40])[0]
    got = client.generate(prompt, max_tokens=40, temperature=0.0)
    assert got.token_ids == want
    assert got.text == tokenizer.decode(want, skip_special_tokens=True)


def test_64_concurrent_streams_complete(client):
    async def run_all():
        aclient = AsyncClient(client_address(client))
        try:
            return await asyncio.gather(*[
                aclient.generate(f"class C{i}:\n    def ", max_tokens=24, temperature=0.0, ignore_eos=True)
                for i in range(64)])
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    assert len(results) == 64
    assert all(r.completion_tokens == 24 and r.finish_reason == "length" for r in results)
    assert len({r.request_id for r in results}) == 64
    wait_idle(client)


def test_cancelled_streams_free_kv_blocks(client):
    idle = wait_idle(client)
    idle_free = {i["instance_id"]: int(i["load"]["num_free_blocks"]) for i in idle["instances"]}

    async def start_and_cancel():
        aclient = AsyncClient(client_address(client))
        calls = [aclient.stream("import os\n" * (20 + i), max_tokens=600, temperature=0.0, ignore_eos=True)
                 for i in range(8)]
        for call in calls:
            async for _ in call:
                break  # one message is enough: the request is running and holds KV blocks
        busy = status_to_dict(await aclient.cluster_status())
        for call in calls:
            call.cancel()
        await aclient.close()
        return busy

    busy = asyncio.run(start_and_cancel())
    assert busy["requests_in_flight"] == 8
    after = wait_idle(client, timeout_s=30)
    assert {i["instance_id"]: int(i["load"]["num_free_blocks"]) for i in after["instances"]} == idle_free


@pytest.mark.parametrize("kwargs,code,fragment", [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (dict(prompt=[5] * MAX_MODEL_LEN), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    (dict(prompt="x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="x", max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="x", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="x", temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="x", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompt="x", top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompt=[10 ** 9]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
])
def test_bad_input_gets_clear_status(client, kwargs, code, fragment):
    prompt = kwargs.pop("prompt")
    with pytest.raises(grpc.RpcError) as exc:
        client.generate(prompt, **kwargs)
    assert exc.value.code() == code
    assert fragment in exc.value.details()
    assert client.generate("x", max_tokens=2, temperature=0.0).completion_tokens == 2


def test_abort_unknown_id_is_not_found(client):
    with pytest.raises(grpc.RpcError) as exc:
        client.abort("no-such-request")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_duplicate_id_and_abort(client):
    async def scenario():
        aclient = AsyncClient(client_address(client))
        first = aclient.stream("while True:\n", request_id="dup-1", max_tokens=800, temperature=0.0,
                               ignore_eos=True)
        it = first.__aiter__()
        await it.__anext__()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await aclient.generate("x", request_id="dup-1", max_tokens=2)
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
        await aclient.abort("dup-1")
        last = None
        async for msg in it:
            last = msg
        await aclient.close()
        return last

    last = asyncio.run(scenario())
    assert last.finished and last.finish_reason == 3  # FINISH_REASON_ABORT
    wait_idle(client)
    # The id is free again once the request ended.
    assert client.generate("x", request_id="dup-1", max_tokens=2, temperature=0.0).completion_tokens == 2


def test_stop_string_truncates_text(client):
    full = client.generate("def main():\n", max_tokens=40, temperature=0.0, ignore_eos=True)
    stop = full.text[10:13]
    assert len(stop) == 3
    cut = client.generate("def main():\n", max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids
    wait_idle(client)


def test_seeded_sampling_is_reproducible(client):
    a = client.generate("import ", max_tokens=30, temperature=0.9, seed=1234, ignore_eos=True)
    b = client.generate("import ", max_tokens=30, temperature=0.9, seed=1234, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_health_and_reflection(colocated_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(colocated_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "disagg.v1.DisaggServe"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"disagg.v1.DisaggServe", "grpc.health.v1.Health"} <= names


def test_prometheus_metrics(client, colocated_server):
    client.generate("x = ", max_tokens=4, temperature=0.0)
    text = colocated_server.metrics_text()
    for name in ("disagg_time_to_first_token_seconds_count", "disagg_time_per_output_token_seconds_count",
                 "disagg_inter_token_latency_seconds_count", "disagg_e2e_request_latency_seconds_count",
                 'disagg_requests_total{finish_reason="length",status="OK"}',
                 'disagg_instance_kv_free_blocks{instance="colocated-0",role="colocated"}'):
        assert name in text, name
    ttft_count = [line for line in text.splitlines() if line.startswith("disagg_time_to_first_token_seconds_count")]
    assert float(ttft_count[0].split()[-1]) >= 1


def test_cli_generate_and_status(client, colocated_server):
    cli = [sys.executable, "-m", "cluster.entrypoints.cli"]
    out = subprocess.run(cli + ["generate", "--server", colocated_server.address, "--max-tokens", "12",
                                "def f(x):"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = client.generate("def f(x):", max_tokens=12, temperature=0.0).text
    assert out.stdout == expected + "\n"  # only the completion on stdout
    assert "finish=" in out.stderr
    st = subprocess.run(cli + ["status", "--server", colocated_server.address, "--json"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert [i["role"] for i in status["instances"]] == ["colocated", "colocated"]
    table = subprocess.run(cli + ["status", "--server", colocated_server.address], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert "colocated-0" in table.stdout and "FREE/TOTAL BLOCKS" in table.stdout


def client_address(client) -> str:
    return client.address
