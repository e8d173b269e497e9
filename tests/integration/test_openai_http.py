"""The OpenAI-compatible HTTP API of a real `disagg-serve up` (real Ray, real vLLM CPU engines,
uvicorn in the router's event loop): the official `openai` client, streaming and not, completions
and chat, gives the gRPC path's and the plain engine's greedy text; vLLM's own benchmark module
completes a run against it; bad input gets its status and an OpenAI error body; a client that
hangs up frees its KV; admission control answers 429 with Retry-After; and 1P+1D serves it too."""

from __future__ import annotations

import asyncio
import sysconfig
from pathlib import Path

import httpx
import openai
import pytest

from cluster.bench.vllm_bench import run_vllm_bench
from cluster.client import Client
from tests.integration.support import ENGINE_ARGS, run_server, wait_idle

TOKEN = "http-test-token"
MAX_IN_FLIGHT = 8
SOURCE = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
# Prompts of real text (chars of the stdlib's argparse source) and their output lengths.
PROMPTS = [(SOURCE[0:300], 32), (SOURCE[4000:4090], 20), (SOURCE[9000:9700], 40), (SOURCE[15000:15040], 24)]


@pytest.fixture(scope="module")
def http_server(target_model):
    yield from run_server(["--colocated", "1", "--model", target_model, *ENGINE_ARGS, "--auth-token", TOKEN,
                           "--max-in-flight", str(MAX_IN_FLIGHT)])


@pytest.fixture
def grpc_client(http_server):
    with Client(http_server.address, timeout=300, auth_token=TOKEN) as c:
        yield c


def openai_client(server, api_key: str = TOKEN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=api_key, max_retries=0, timeout=300)


def reference(llm, prompt_ids: list[list[int]], max_tokens: list[int]) -> list:
    """The plain engine's greedy outputs (token ids and the text vLLM decodes for them)."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens]
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params,
                                              use_tqdm=False)]


async def _completions(server, model: str, stream: bool) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion_tokens) per prompt, all sent at once."""
    client = openai_client(server)

    async def one(prompt: str, max_tokens: int):
        if not stream:
            r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                                extra_body={"priority": 1})
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        parts, finish, used = [], None, None
        events = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0.0, stream=True,
                                                 stream_options={"include_usage": True})
        async for event in events:
            if event.choices:
                parts.append(event.choices[0].text)
                finish = event.choices[0].finish_reason or finish
            if event.usage is not None:
                used = event.usage.completion_tokens
        return "".join(parts), finish, used

    try:
        return await asyncio.gather(*[one(p, n) for p, n in PROMPTS])
    finally:
        await client.close()


def test_completions_equal_the_grpc_path_and_the_plain_engine(http_server, grpc_client, reference_llm, tokenizer,
                                                              target_model):
    expected = reference(reference_llm, [tokenizer.encode(p) for p, _ in PROMPTS], [n for _, n in PROMPTS])
    over_grpc = [grpc_client.generate(p, max_tokens=n, temperature=0.0) for p, n in PROMPTS]
    whole = asyncio.run(_completions(http_server, target_model, stream=False))
    streamed = asyncio.run(_completions(http_server, target_model, stream=True))
    for want, grpc_out, http_whole, http_streamed in zip(expected, over_grpc, whole, streamed, strict=True):
        assert grpc_out.token_ids == list(want.token_ids)
        assert http_whole == (grpc_out.text, grpc_out.finish_reason, len(want.token_ids))
        assert http_streamed == http_whole
        assert http_whole[0] == want.text  # and what vLLM itself decodes
    wait_idle(grpc_client)


def test_chat_completions_equal_the_plain_engine_through_the_chat_template(http_server, grpc_client, reference_llm,
                                                                         tokenizer, target_model):
    conversations = [[{"role": "system", "content": "You write Python."},
                      {"role": "user", "content": "Parse the command line."}],
                     [{"role": "user", "content": "def fibonacci(n):"}]]
    prompt_ids = [tokenizer.encode(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                                   add_special_tokens=False) for c in conversations]
    assert all(ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1 for ids in prompt_ids)
    expected = reference(reference_llm, prompt_ids, [24, 24])
    over_grpc = [grpc_client.generate(ids, max_tokens=24, temperature=0.0) for ids in prompt_ids]

    async def chat():
        client = openai_client(http_server)
        try:
            out = []
            for messages in conversations:
                whole = await client.chat.completions.create(model=target_model, messages=messages,
                                                             max_completion_tokens=24, temperature=0.0)
                events = await client.chat.completions.create(model=target_model, messages=messages, max_tokens=24,
                                                              temperature=0.0, stream=True)
                streamed = "".join([e.choices[0].delta.content or "" async for e in events if e.choices])
                out.append((whole.choices[0].message.content, streamed, whole.usage.prompt_tokens))
            return out
        finally:
            await client.close()

    for want, grpc_out, ids, (whole, streamed, prompt_tokens) in zip(expected, over_grpc, prompt_ids,
                                                                    asyncio.run(chat()), strict=True):
        assert grpc_out.token_ids == list(want.token_ids)
        assert whole == streamed == grpc_out.text == want.text
        assert prompt_tokens == len(ids)
    wait_idle(grpc_client)


def test_vllm_benchmark_module_completes_against_our_http_port(http_server, grpc_client, target_model, monkeypatch,
                                                               tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)  # vLLM's benchmark sends it as the bearer token
    num_prompts, output_len = 12, 16
    result = run_vllm_bench([
        "--backend", "openai", "--base-url", http_server.http_url, "--endpoint", "/v1/completions",
        "--model", target_model, "--dataset-name", "random", "--random-input-len", "48",
        "--random-output-len", str(output_len), "--num-prompts", str(num_prompts), "--max-concurrency", "4",
        "--temperature", "0", "--ignore-eos", "--seed", "1", "--disable-tqdm"],
        timeout_s=900, log_path=tmp_path / "bench.log")
    assert result["completed"] == num_prompts and result["failed"] == 0, (tmp_path / "bench.log").read_text()[-3000:]
    assert result["total_output_tokens"] == num_prompts * output_len
    wait_idle(grpc_client)


BAD = [
    (b'{"prompt": "x", "max_tokens": ', 400, None, "not valid JSON"),
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens", "valid integer"),
    ({"prompt": 42}, 400, "prompt", "prompt"),
    ({"prompt": "x", "n": 3}, 400, "n", "only n=1"),
    ({"prompt": "x", "logprobs": 1}, 400, "logprobs", "not supported yet"),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model", "does not exist"),
    ({"prompt": "abc " * 2000}, 400, "prompt", "the limit is 1023"),
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens", "must be >= 1"),
    ({"prompt": "x", "max_tokens": 2000}, 400, "max_tokens", "exceeds the model's max length"),
]


def test_bad_input_gets_its_status_and_an_openai_error_and_nothing_leaks(http_server, grpc_client, target_model):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with httpx.Client(base_url=http_server.http_url, timeout=120) as http:
        for body, status, param, fragment in BAD:
            content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
            r = http.post("/v1/completions", content=content, headers=headers)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert fragment in error["message"] and error["param"] == param, (body, error)
        unauthenticated = http.post("/v1/completions", json={"prompt": "x"})
        assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models").status_code == 401
        # The server keeps serving, and the refusals left nothing behind.
        ok = http.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 3, "temperature": 0}, headers=headers)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        models = http.get("/v1/models", headers=headers).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [(target_model, 1024)]
        assert http.get("/health").json() == {"status": "ok"}
        assert "disagg_requests_total" in http.get("/metrics").text
    wait_idle(grpc_client)


def _cancelled(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('disagg_requests_total{finish_reason="none",status="CANCELLED"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_hangs_up_aborts_its_request_and_frees_its_kv(http_server, grpc_client):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    long_request = {"prompt": "import os\n", "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=http_server.http_url, timeout=120, headers=headers) as http:
        before = _cancelled(http)
        with http.stream("POST", "/v1/completions", json={**long_request, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break  # leaving the block closes the connection mid-stream
        status = wait_idle(grpc_client)
        generated = int(status["instances"][0]["tokens_generated"])
        # Non-streamed: the client gives up waiting for the whole response.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=long_request, timeout=1.5)
        status = wait_idle(grpc_client)
        after = _cancelled(http)
    assert after - before == 2
    # Both were cut short: far fewer tokens than the 1,800 the two asked for.
    assert int(status["instances"][0]["tokens_generated"]) - generated < 900
    assert status["requests_in_flight"] == 0


def test_admission_control_answers_429_with_retry_after(http_server, grpc_client):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    long_request = {"prompt": "class Parser:\n", "max_tokens": 900, "ignore_eos": True, "stream": True}

    async def fill_then_ask():
        async with httpx.AsyncClient(base_url=http_server.http_url, timeout=120, headers=headers) as http:
            streams = []
            try:
                for _ in range(MAX_IN_FLIGHT):
                    cm = http.stream("POST", "/v1/completions", json=long_request)
                    response = await cm.__aenter__()
                    assert response.status_code == 200
                    streams.append(cm)
                refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                client = openai.AsyncOpenAI(base_url=f"{http_server.http_url}/v1", api_key=TOKEN, max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    await client.completions.create(model=None, prompt="x", max_tokens=2)
                return refused
            finally:
                for cm in streams:
                    await cm.__aexit__(None, None, None)

    refused = asyncio.run(fill_then_ask())
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1 and int(refused.headers["retry-after-ms"]) > 0
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    wait_idle(grpc_client)


def test_disaggregated_serves_the_http_api_with_the_engines_greedy_text(disagg_server, disagg_client, reference_llm,
                                                                       tokenizer, target_model):
    expected = reference(reference_llm, [tokenizer.encode(p) for p, _ in PROMPTS], [n for _, n in PROMPTS])
    whole = asyncio.run(_completions(disagg_server, target_model, stream=False))
    streamed = asyncio.run(_completions(disagg_server, target_model, stream=True))
    for want, http_whole, http_streamed in zip(expected, whole, streamed, strict=True):
        assert http_whole[0] == http_streamed[0] == want.text
        assert http_whole[2] == http_streamed[2] == len(want.token_ids)
    wait_idle(disagg_client)
