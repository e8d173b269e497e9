"""Pure mapping: OpenAI bodies to GenerationParams (and the refusals), stream chunks to
response objects, and that both front doors meet in one validation core."""

from __future__ import annotations

import grpc
import pytest

from cluster.client import build_request
from router.errors import RequestError
from router.openai.backend import ServedModel
from router.openai.mapping import (
    ResponseBuilder,
    chat_params,
    check_model,
    completion_params,
    parse_body,
    refuse_unsupported_chat,
)
from router.openai.schema import ChatCompletionRequest, CompletionRequest
from router.validation import GenerationParams, validate, validate_params
from tests.unit.router.openai.fakes import LIMITS, CharTokenizer, Chunk


def completion(**body) -> GenerationParams:
    return completion_params(parse_body(CompletionRequest, {"prompt": "hi", **body}))


def refused(fn, param: str, fragment: str) -> RequestError:
    with pytest.raises(RequestError) as exc:
        fn()
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.http_status == 400
    assert exc.value.param == param and fragment in exc.value.message, exc.value.message
    return exc.value


def test_completion_fields_map_one_to_one():
    p = completion(max_tokens=7, temperature=0.5, top_p=0.9, top_k=4, min_tokens=2, stop="\n", seed=3,
                   stop_token_ids=[9], ignore_eos=True, priority=2, request_id="abc", user="me",
                   repetition_penalty=1.0, presence_penalty=0, n=1, logprobs=None, stream=False)
    assert p == GenerationParams(prompt_text="hi", max_tokens=7, temperature=0.5, top_p=0.9, top_k=4, min_tokens=2,
                                 stop=["\n"], stop_token_ids=[9], seed=3, ignore_eos=True, priority=2,
                                 request_id="abc")


@pytest.mark.parametrize("prompt, text, ids", [("x", "x", None), (["x"], "x", None), ([1, 2], None, [1, 2]),
                                               ([[1, 2]], None, [1, 2])])
def test_completion_prompt_forms(prompt, text, ids):
    p = completion_params(parse_body(CompletionRequest, {"prompt": prompt}))
    assert (p.prompt_text, p.prompt_token_ids) == (text, ids)


@pytest.mark.parametrize("body, param, fragment", [
    ({"n": 2}, "n", "only n=1"),
    ({"best_of": 3}, "best_of", "only best_of=1"),
    ({"logprobs": 1}, "logprobs", "not supported yet"),
    ({"logprobs": 0}, "logprobs", "not supported yet"),
    ({"echo": True}, "echo", "not supported"),
    ({"suffix": "x"}, "suffix", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"frequency_penalty": -1.0}, "frequency_penalty", "not supported"),
    ({"repetition_penalty": 1.1}, "repetition_penalty", "not supported"),
    ({"min_p": 0.1}, "min_p", "not supported"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ({"use_beam_search": True}, "use_beam_search", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "only type 'text'"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream=true"),
    ({"prompt": ["a", "b"]}, "prompt", "batch of 2"),
])
def test_unsupported_completion_options_are_refused_by_name(body, param, fragment):
    refused(lambda: completion(**body), param, fragment)


@pytest.mark.parametrize("body, param, fragment", [
    ({"max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"max_tokens": 5.0}, "max_tokens", "valid integer"),
    ({"temperature": "0"}, "temperature", "valid number"),
    ({"ignore_eos": 1}, "ignore_eos", "valid boolean"),
    ({"stop": 5}, "stop", "stop"),
    ({"prompt": None}, "prompt", "prompt"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options", "stream_options.include_usage"),
])
def test_wrong_types_are_400_naming_the_field(body, param, fragment):
    refused(lambda: parse_body(CompletionRequest, {"prompt": "hi", **body}), param, fragment)


def test_body_must_be_an_object():
    refused(lambda: parse_body(CompletionRequest, [1]), None, "JSON object")


def test_chat_max_completion_tokens_and_refusals():
    def chat(**body):
        return parse_body(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], **body})

    assert chat_params(chat(max_completion_tokens=4), [1, 2]).max_tokens == 4
    assert chat_params(chat(max_tokens=5), [1, 2]).max_tokens == 5
    assert chat_params(chat(max_tokens=5, max_completion_tokens=5), [1, 2]).prompt_token_ids == [1, 2]
    refused(lambda: chat_params(chat(max_tokens=5, max_completion_tokens=6), [1]), "max_completion_tokens",
            "disagree")
    for body, param in (({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "logprobs"),
                        ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
                        ({"n": 4}, "n")):
        refused(lambda body=body: refuse_unsupported_chat(chat(**body)), param, "")
    refuse_unsupported_chat(chat(tool_choice="none", logprobs=False))  # the neutral values pass


def test_model_names():
    model = ServedModel("demo", "/models/demo", LIMITS, CharTokenizer())
    for ok in (None, "demo", "/models/demo"):
        check_model(ok, model)
    with pytest.raises(RequestError) as exc:
        check_model("gpt-4", model)
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and exc.value.http_status == 404
    assert exc.value.param == "model"


def test_one_validation_core_for_both_front_doors():
    """The same request over gRPC and over HTTP validates to the same thing, and the same bad
    request fails with the same message."""
    tokenize = CharTokenizer().encode
    grpc_request = build_request("hello", max_tokens=5, temperature=0.0, top_k=3, stop=["\n"], seed=1,
                                 ignore_eos=True, priority=2, request_id="r")
    http_params = completion(prompt="hello", max_tokens=5, temperature=0.0, top_k=3, stop=["\n"], seed=1,
                             ignore_eos=True, priority=2, request_id="r")
    assert validate(grpc_request, tokenize, LIMITS) == validate_params(http_params, tokenize, LIMITS)
    for field, value in (("max_tokens", -1), ("top_p", 1.5), ("min_tokens", 99), ("top_k", -2)):
        with pytest.raises(RequestError) as over_grpc:
            validate(build_request("hello", **{field: value}), tokenize, LIMITS)
        with pytest.raises(RequestError) as over_http:
            validate_params(completion(prompt="hello", **{field: value}), tokenize, LIMITS)
        assert over_grpc.value.message == over_http.value.message and over_http.value.param == field


def test_seed_and_priority_ranges():
    tokenize = CharTokenizer().encode
    refused(lambda: validate_params(completion(seed=2 ** 64), tokenize, LIMITS), "seed", "must be in")
    refused(lambda: validate_params(completion(priority=2 ** 40), tokenize, LIMITS), "priority", "must be in")


# --- responses ----------------------------------------------------------------------------

def test_completion_chunks_and_whole():
    b = ResponseBuilder("completion", "r1", "demo", 123, include_usage=True)
    first = b.chunk(Chunk("r1", [1], "a"))
    assert first == {"id": "cmpl-r1", "object": "text_completion", "created": 123, "model": "demo",
                     "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}], "usage": None}
    final = Chunk("r1", [2], "b", finished=True, finish_reason="stop", stop_reason="\n\n", prompt_tokens=4,
                  completion_tokens=2)
    last = b.chunk(final)
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["stop_reason"] == "\n\n"
    assert b.usage_chunk(final) == {"id": "cmpl-r1", "object": "text_completion", "created": 123, "model": "demo",
                                    "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2,
                                                             "total_tokens": 6}}
    whole = b.whole("ab", final)
    assert whole["choices"][0]["text"] == "ab" and whole["usage"]["total_tokens"] == 6 and "usage" in whole


def test_chat_chunks_send_the_role_once_and_stop_token_ids_as_ints():
    b = ResponseBuilder("chat", "r1", "demo", 1)
    deltas = [b.chunk(Chunk("r1", [i], text))["choices"][0]["delta"] for i, text in ((1, "a"), (2, "b"))]
    assert deltas == [{"role": "assistant", "content": "a"}, {"content": "b"}]
    stopped = Chunk("r1", [], "", finished=True, finish_reason="stop", stop_reason="7")
    assert b.chunk(stopped)["choices"][0]["stop_reason"] == 7
    assert "usage" not in b.chunk(stopped)
    eos = Chunk("r1", [], "", finished=True, finish_reason="stop", stop_reason="")
    whole = b.whole("ab", eos)
    assert whole["object"] == "chat.completion" and whole["id"] == "chatcmpl-r1"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert whole["choices"][0]["stop_reason"] is None
