"""Bad input and hostile load against a real server: fuzzed requests (hypothesis), invalid
UTF-8 on the wire, 1,000 concurrent streams past admission control, client deadlines, and
TLS + bearer-token authentication."""

from __future__ import annotations

import asyncio
import subprocess

import grpc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.client import AsyncClient, Client, build_request
from proto import disagg_pb2 as pb
from tests.integration.support import ENGINE_ARGS, ServerProcess, run_server, wait_idle

MAX_IN_FLIGHT = 48
EXPECTED_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}


@pytest.fixture(scope="module")
def small_server(target_model):
    yield from run_server(["--colocated", "1", "--model", target_model, *ENGINE_ARGS,
                           "--max-in-flight", str(MAX_IN_FLIGHT), "--max-tokens-limit", "64"])


@pytest.fixture
def small_client(small_server):
    with Client(small_server.address, timeout=120) as c:
        yield c


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10).map(float))
ints32 = st.integers(-(2 ** 31), 2 ** 31 - 1)
prompts = st.one_of(st.text(max_size=200), st.lists(ints32, max_size=50),
                    st.text(min_size=5000, max_size=70000))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=prompts, temperature=st.one_of(st.none(), numbers), top_p=st.one_of(st.none(), numbers),
       top_k=st.one_of(st.none(), ints32), max_tokens=st.one_of(st.none(), st.integers(-5, 5000)),
       min_tokens=st.one_of(st.none(), st.integers(-5, 100)), stop=st.lists(st.text(max_size=300), max_size=20),
       stop_ids=st.lists(ints32, max_size=70), seed=st.one_of(st.none(), st.integers(-(2 ** 63), 2 ** 63 - 1)),
       priority=ints32)
def test_fuzzed_requests_get_proper_statuses(small_client, prompt, temperature, top_p, top_k, max_tokens,
                                             min_tokens, stop, stop_ids, seed, priority):
    request = build_request(prompt, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                            min_tokens=min_tokens, stop=stop, stop_token_ids=stop_ids, seed=seed,
                            priority=priority)
    try:
        for msg in small_client.stub.Generate(request, timeout=120):
            assert msg.request_id
    except grpc.RpcError as exc:
        assert exc.code() in EXPECTED_CODES, (exc.code(), exc.details())
        assert exc.details()


def test_server_still_serves_after_fuzzing(small_client):
    assert small_client.generate("x = ", max_tokens=3, temperature=0.0).completion_tokens == 3
    wait_idle(small_client)


def test_invalid_utf8_on_the_wire_is_invalid_argument(small_server):
    valid = build_request("hello", stop=["QQ"], max_tokens=2).SerializeToString()
    broken = valid.replace(b"QQ", b"\xff\xfe")
    with grpc.insecure_channel(small_server.address) as channel:
        call = channel.unary_stream("/disagg.v1.DisaggServe/Generate", request_serializer=lambda b: b,
                                    response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as exc:
            list(call(broken, timeout=30))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as exc:
            list(call(b"\x0a\xff\xff\xff\xff\xff\xff", timeout=30))  # not a message at all
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_overload_1000_streams(small_server, small_client):
    proc = psutil.Process(small_server.proc.pid)
    rss_before = proc.memory_info().rss

    async def one(aclient, i):
        try:
            done = await aclient.generate(f"item_{i} = ", max_tokens=8, temperature=0.0, ignore_eos=True,
                                          timeout=600)
            return "ok" if done.completion_tokens == 8 else "short"
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
                return "rejected-with-hint" if hint or "retry" in (exc.details() or "") else "rejected"
            return exc.code().name

    async def run_all():
        clients = [AsyncClient(small_server.address) for _ in range(4)]  # several connections
        try:
            return await asyncio.gather(*[one(clients[i % 4], i) for i in range(1000)])
        finally:
            for c in clients:
                await c.close()

    results = asyncio.run(asyncio.wait_for(run_all(), timeout=900))
    counts = {k: results.count(k) for k in set(results)}
    assert set(counts) <= {"ok", "rejected-with-hint"}, counts
    assert counts.get("ok", 0) >= MAX_IN_FLIGHT and counts.get("rejected-with-hint", 0) > 0
    rss_growth_mb = (proc.memory_info().rss - rss_before) / 1e6
    assert rss_growth_mb < 400, f"router memory grew by {rss_growth_mb:.0f} MB under overload"
    wait_idle(small_client)
    print(f"\noverload: {counts}, router RSS growth {rss_growth_mb:.0f} MB")


def test_client_deadline_aborts_and_frees(small_client):
    idle = wait_idle(small_client)
    with pytest.raises(grpc.RpcError) as exc:
        small_client.generate("while True:\n", max_tokens=64, temperature=0.0, ignore_eos=True, timeout=0.05)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = wait_idle(small_client, timeout_s=30)
    assert after["instances"][0]["load"]["num_free_blocks"] == idle["instances"][0]["load"]["num_free_blocks"]


def test_max_tokens_limit_enforced_at_the_edge(small_client):
    with pytest.raises(grpc.RpcError) as exc:
        small_client.generate("x", max_tokens=65)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in exc.value.details()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_tls_and_bearer_token(target_model, tls_files):
    cert, key = tls_files
    server = ServerProcess(["--colocated", "1", "--model", target_model, *ENGINE_ARGS, "--tls-cert", cert,
                            "--tls-key", key, "--auth-token", "s3cret"])
    try:
        address = f"localhost:{server.port}"
        with Client(address, tls_ca=cert, auth_token="s3cret") as ok:
            assert ok.generate("x = ", max_tokens=2, temperature=0.0).completion_tokens == 2
        with Client(address, tls_ca=cert, auth_token="wrong") as bad:
            with pytest.raises(grpc.RpcError) as exc:
                bad.generate("x = ", max_tokens=2)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(address, tls_ca=cert) as anonymous:
            with pytest.raises(grpc.RpcError) as exc:
                anonymous.cluster_status()
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_pb2_grpc.HealthStub(anonymous.channel)  # probes need no token
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        with Client(address, timeout=10) as plaintext:
            with pytest.raises(grpc.RpcError) as exc:
                plaintext.cluster_status()
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0
