"""Chat messages through a real Hugging Face tokenizer's apply_chat_template, the demo chat
template, --chat-template loading, and the demo caches getting the template in place."""

from __future__ import annotations

import json

import pytest

from cluster.models.tokenizer import DEMO_CHAT_TEMPLATE, ensure_chat_template
from router.errors import RequestError
from router.openai.chat import chat_prompt_ids, load_chat_template, render_chat
from router.openai.mapping import parse_body
from router.openai.schema import ChatCompletionRequest


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|bos|>": 0, "<|eos|>": 1, "[UNK]": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    hf.chat_template = DEMO_CHAT_TEMPLATE
    return hf


def chat(**body) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **body})


def test_demo_template_writes_a_conversation_as_python_comments(hf_tokenizer):
    request = chat(messages=[{"role": "system", "content": "be\nbrief"},
                             {"role": "user", "content": [{"type": "text", "text": "sort"},
                                                          {"type": "text", "text": "a list"}]}])
    assert render_chat(hf_tokenizer, request, None) == (
        "<|bos|># system: be\n# brief\n# user: sort\n# a list\n# assistant:\n")
    assert render_chat(hf_tokenizer, chat(add_generation_prompt=False), None) == "<|bos|># user: hi\n"
    # The template wrote BOS; tokenizing must not add a second one.
    assert chat_prompt_ids(hf_tokenizer, chat(), None, 1024)[:2] == [0, 2]


def test_a_given_template_replaces_the_tokenizers(hf_tokenizer):
    assert render_chat(hf_tokenizer, chat(), "{% for m in messages %}[{{ m['content'] }}]{% endfor %}") == "[hi]"


def test_chat_refusals(hf_tokenizer):
    def refused(fn, fragment):
        with pytest.raises(RequestError) as exc:
            fn()
        assert exc.value.http_status == 400 and fragment in exc.value.message, exc.value.message

    refused(lambda: render_chat(hf_tokenizer, chat(messages=[]), None), "must not be empty")
    refused(lambda: render_chat(hf_tokenizer, chat(add_generation_prompt=True, continue_final_message=True), None),
            "cannot both be true")
    refused(lambda: render_chat(hf_tokenizer, chat(), "{{ raise_exception('no system role') }}"),
            "no system role")
    refused(lambda: render_chat(hf_tokenizer, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
                                None), "only text parts")
    refused(lambda: chat_prompt_ids(hf_tokenizer, chat(messages=[{"role": "user", "content": "x" * 700}]), None, 10),
            "far beyond")

    class NoTemplate:
        chat_template = None

    refused(lambda: render_chat(NoTemplate(), chat(), None), "--chat-template")


def test_load_chat_template(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert load_chat_template(str(path)) == "{{ messages }}"
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_ensure_chat_template_upgrades_an_old_cache_in_place(tmp_path):
    config = {"bos_token": "<|bos|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ensure_chat_template(tmp_path)
    ensure_chat_template(tmp_path)  # idempotent
    upgraded = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert upgraded == {**config, "chat_template": DEMO_CHAT_TEMPLATE}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer_config.json"]  # no temp file left
