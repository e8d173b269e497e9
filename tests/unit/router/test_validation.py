import math

import grpc
import pytest

from proto import disagg_pb2 as pb
from router.errors import RequestError
from router.validation import Limits, validate

LIMITS = Limits(max_model_len=64, vocab_size=100, default_max_tokens=16, max_prompt_tokens=63)


def tokenize(text):
    return [ord(c) % 100 for c in text]


def req(prompt="hello", **sampling):
    r = pb.GenerateRequest()
    if isinstance(prompt, str):
        r.text = prompt
    else:
        r.token_ids.ids.extend(prompt)
    for k, v in sampling.items():
        if isinstance(v, list):
            getattr(r.sampling, k).extend(v)
        else:
            setattr(r.sampling, k, v)
    return r


def invalid(r, fragment):
    with pytest.raises(RequestError) as exc:
        validate(r, tokenize, LIMITS)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in exc.value.message
    return exc.value


def test_defaults():
    v = validate(req("hello"), tokenize, LIMITS)
    assert v.prompt_token_ids == tuple(tokenize("hello"))
    assert v.sampling.max_tokens == 16 and v.sampling.temperature == 1.0 and v.sampling.top_p == 1.0
    assert v.sampling.seed is None and v.stop_strings == ()


def test_default_max_tokens_clipped_to_room():
    v = validate(req([1] * 60), tokenize, LIMITS)
    assert v.sampling.max_tokens == 4


def test_token_ids_prompt_and_all_fields():
    v = validate(req([1, 2, 3], temperature=0.0, top_p=0.5, top_k=5, max_tokens=10, min_tokens=2,
                     seed=7, stop=["\n\n"], stop_token_ids=[9], ignore_eos=True), tokenize, LIMITS)
    s = v.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.min_tokens, s.seed) == (0.0, 0.5, 5, 10, 2, 7)
    assert s.stop_token_ids == (9,) and s.ignore_eos and v.stop_strings == ("\n\n",)


@pytest.mark.parametrize("prompt,fragment", [("", "empty"), ([], "missing"), ([1] * 64, "limit is 63"),
                                             ([100], "outside the vocabulary"), ([-1], "outside")])
def test_bad_prompts(prompt, fragment):
    r = req(prompt) if prompt != [] else pb.GenerateRequest()
    invalid(r, fragment)


@pytest.mark.parametrize("field,value,fragment", [
    ("max_tokens", 0, "max_tokens must be >= 1"),
    ("max_tokens", -5, "max_tokens must be >= 1"),
    ("max_tokens", 100, "exceeds the model's max length"),
    ("temperature", -0.1, "temperature must be >= 0"),
    ("temperature", math.nan, "finite"),
    ("temperature", math.inf, "finite"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.01, "top_p"),
    ("top_p", math.nan, "finite"),
    ("top_k", -2, "top_k"),
    ("top_k", 1000, "vocabulary size"),
    ("min_tokens", -1, "min_tokens"),
    ("min_tokens", 17, "min_tokens"),
])
def test_bad_sampling(field, value, fragment):
    invalid(req("hi", **{field: value}), fragment)


def test_bad_stops():
    invalid(req("hi", stop=[""]), "must not be empty")
    invalid(req("hi", stop=["x"] * 17), "at most 16")
    invalid(req("hi", stop_token_ids=[1000]), "stop_token_ids")


def test_huge_text_rejected_before_tokenizing():
    def boom(_):
        raise AssertionError("tokenized a huge prompt")

    with pytest.raises(RequestError):
        validate(req("x" * (64 * 64 + 1)), boom, LIMITS)
