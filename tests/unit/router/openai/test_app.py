"""The HTTP API over real loopback HTTP (uvicorn in the test's event loop) against a scripted
front end: response shapes through the official `openai` client, SSE framing, every error status
with its OpenAI error body, auth, and that a client going away closes the front end's stream."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter

from router.errors import RequestError
from router.openai.app import build_app
from router.openai.backend import ServedModel
from router.openai.server import start_http_server
from tests.unit.router.openai.fakes import LIMITS, CharTokenizer, FakeBackend

MODEL = ServedModel(name="demo", root="/models/demo", limits=LIMITS, tokenizer=CharTokenizer(), created=7)


@contextlib.asynccontextmanager
async def serving(backend: FakeBackend, model: ServedModel = MODEL, **kwargs):
    server = await start_http_server(build_app(backend, model, **kwargs), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            yield base, http
    finally:
        await server.stop(grace_s=1.0)


def openai_client(base: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=10)


def events(body: str) -> list[str]:
    """The data of each server-sent event, in order."""
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            out.append(block[len("data: "):])
    return out


def run(coro):
    return asyncio.run(coro)


# --- responses ----------------------------------------------------------------------------

def test_completion_whole_and_streamed_through_the_openai_client():
    backend = FakeBackend()

    async def go():
        async with serving(backend) as (base, _):
            client = openai_client(base)
            whole = await client.completions.create(model="demo", prompt="hello", max_tokens=3,
                                                    temperature=0.0, stop=["zz"], seed=5)
            stream = await client.completions.create(model="demo", prompt=[1, 2, 3], max_tokens=3, stream=True,
                                                     stream_options={"include_usage": True})
            parts = [chunk async for chunk in stream]
            return whole, parts

    whole, parts = run(go())
    assert whole.object == "text_completion" and whole.model == "demo" and whole.id == "cmpl-req-1"
    assert whole.choices[0].text == "t0 t1 t2 " and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (6, 3, 9)
    assert [p.choices[0].text for p in parts[:-1]] == ["t0 ", "t1 ", "t2 "]
    assert [p.choices[0].finish_reason for p in parts[:-1]] == [None, None, "length"]
    assert all(p.usage is None for p in parts[:-1])
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == 3 and parts[-1].usage.prompt_tokens == 3
    first, second = backend.requests
    assert first.prompt_token_ids == (0, *[ord(c) % 100 for c in "hello"])  # BOS added, as for gRPC text
    assert first.sampling.temperature == 0.0 and first.sampling.seed == 5 and first.stop_strings == ("zz",)
    assert second.prompt_token_ids == (1, 2, 3)
    assert backend.ended == ["finished", "finished"]  # run to their end, not closed early


def test_chat_completion_uses_the_template_and_streams_role_then_content():
    backend = FakeBackend()

    async def go():
        async with serving(backend) as (base, http):
            client = openai_client(base)
            whole = await client.chat.completions.create(
                model="/models/demo", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=2)
            raw = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                             {"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
            return whole, raw

    whole, raw = run(go())
    assert whole.object == "chat.completion" and whole.id == "chatcmpl-req-1"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == "t0 t1 "
    # The template writes BOS itself: the rendered text is tokenized without adding it again.
    rendered = "^user: hi\nassistant:"
    assert backend.requests[0].prompt_token_ids == tuple(ord(c) % 100 for c in rendered)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    data = events(raw.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": "t0 "},
                                                          {"content": "t1 "}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    assert raw.headers["x-request-id"] == "req-2"


def test_models_health_and_metrics():
    registry = CollectorRegistry()
    Counter("probe_things", "a counter", registry=registry).inc(3)
    health = {"reason": None}

    async def go():
        async with serving(FakeBackend(), metrics_registry=registry, health=lambda: health["reason"]) as (base, http):
            models = await openai_client(base).models.list()
            ok = await http.get("/health")
            health["reason"] = "no ready decode instance"
            down = await http.get("/health")
            metrics = await http.get("/metrics")
            return models, ok, down, metrics

    models, ok, down, metrics = run(go())
    assert [(m.id, m.root, m.created) for m in models.data] == [("demo", "/models/demo", 7)]
    assert ok.status_code == 200
    assert down.status_code == 503 and down.json()["error"]["message"] == "no ready decode instance"
    assert metrics.status_code == 200 and "probe_things_total 3.0" in metrics.text


# --- errors -------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("/v1/completions", {"prompt": "x", "n": 3}, 400, "n", "only n=1"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "x" * 100}, 400, "prompt", "limit is 63"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "must be >= 1"),
    ("/v1/completions", {"prompt": [5, 500]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")}, 400, "temperature", "finite"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "must not be empty"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "valid list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "only text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools", "not supported"),
]


@pytest.mark.parametrize("path, body, status, param, fragment", BAD_REQUESTS)
def test_bad_requests_get_their_status_and_an_openai_error_body(path, body, status, param, fragment):
    backend = FakeBackend()

    async def go():
        async with serving(backend) as (_, http):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            bad = await http.post(path, content=content, headers={"content-type": "application/json"})
            good = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            return bad, good

    bad, good = run(go())
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert good.status_code == 200  # and the server keeps serving
    assert len(backend.requests) == 1  # the bad one never reached the front end


def test_front_end_refusals_map_to_429_with_retry_after_and_503():
    backend = FakeBackend()

    async def go():
        async with serving(backend) as (base, http):
            backend.error = RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy", retry_after_ms=1500)
            busy = await http.post("/v1/completions", json={"prompt": "x"})
            with pytest.raises(openai.RateLimitError) as limited:
                await openai_client(base).completions.create(model="demo", prompt="x", stream=True)
            backend.error = RequestError(grpc.StatusCode.UNAVAILABLE, "no colocated instance is available")
            down = await http.post("/v1/completions", json={"prompt": "x", "stream": True})
            return busy, limited.value, down

    busy, limited, down = run(go())
    assert busy.status_code == 429 and busy.headers["retry-after"] == "2" and busy.headers["retry-after-ms"] == "1500"
    assert busy.json()["error"] == {"message": "server busy", "type": "rate_limit_error", "param": None,
                                    "code": "rate_limit_exceeded"}
    assert limited.status_code == 429
    assert down.status_code == 503 and down.json()["error"]["type"] == "server_error"


def test_failure_after_the_stream_started_is_an_error_event():
    backend = FakeBackend()
    backend.error = RequestError(grpc.StatusCode.INTERNAL, "instance colocated-0 failed the request: boom")
    backend.fail_after = 2

    async def go():
        async with serving(backend) as (base, http):
            raw = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True})
            with pytest.raises(openai.APIError) as failed:
                stream = await openai_client(base).completions.create(model="demo", prompt="x", max_tokens=5,
                                                                      stream=True)
                async for _ in stream:
                    pass
            return raw, failed.value

    raw, failed = run(go())
    data = events(raw.text)
    assert [json.loads(d)["choices"][0]["text"] for d in data[:2]] == ["t0 ", "t1 "]
    assert json.loads(data[2])["error"]["message"].endswith("boom") and data[3] == "[DONE]"
    assert "boom" in str(failed)


def test_bearer_token_guards_the_api_but_not_health():
    async def go():
        async with serving(FakeBackend(), auth_token="s3cret") as (base, http):
            missing = await http.post("/v1/completions", json={"prompt": "x"})
            with pytest.raises(openai.AuthenticationError):
                await openai_client(base, api_key="wrong").models.list()
            good = await openai_client(base, api_key="s3cret").completions.create(model="demo", prompt="x",
                                                                                    max_tokens=1)
            health = await http.get("/health")
            return missing, good, health

    missing, good, health = run(go())
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert good.choices[0].text == "t0 " and health.status_code == 200


def test_unknown_route_and_method_are_openai_errors():
    async def go():
        async with serving(FakeBackend()) as (_, http):
            return await http.get("/v1/nothing"), await http.get("/v1/completions")

    missing, wrong_method = run(go())
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# --- clients that go away ------------------------------------------------------------------

async def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_before_the_first_chunk_closes_the_stream(stream):
    backend = FakeBackend()
    backend.gate = asyncio.Event()  # nothing comes until the test says so (a long queue)

    async def go():
        async with serving(backend) as (_, http):
            call = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "x", "stream": stream}))
            await _wait_for(lambda: backend.requests)
            call.cancel()  # the client hangs up
            await _wait_for(lambda: backend.ended)
            backend.gate.set()
            return await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})

    after = run(go())
    assert backend.ended == ["closed", "finished"] and after.status_code == 200


def test_client_gone_mid_stream_closes_the_stream():
    backend = FakeBackend()
    backend.step_s = 0.05

    async def go():
        async with serving(backend) as (_, http):
            async with http.stream("POST", "/v1/completions",
                                   json={"prompt": "x", "max_tokens": 50, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # got the first token: hang up
            await _wait_for(lambda: backend.ended)

    run(go())
    assert backend.ended == ["closed"]
