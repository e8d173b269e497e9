"""`disagg-serve up` flags of the OpenAI HTTP API and the engine defaults it left to vLLM."""

from __future__ import annotations

import pytest
import yaml

from cluster.config import EngineConfig
from cluster.entrypoints import cli
from tests import REPO

BASE = ["up", "--model", "/models/m", "--colocated", "1"]


def config(*argv: str):
    return cli.serve_config_from_args(cli.parse_args([*BASE, *argv]))


def test_http_api_is_off_unless_asked():
    router = config().router
    assert (router.http_port, router.served_model_name, router.chat_template) == (None, None, None)


def test_http_flags(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    router = config("--http-port", "8000", "--served-model-name", "demo", "--chat-template", str(template)).router
    assert (router.http_port, router.served_model_name, router.chat_template) == (8000, "demo", str(template))


def test_a_chat_template_that_is_neither_file_nor_template_exits_at_once():
    with pytest.raises(SystemExit) as exc:
        config("--chat-template", "/no/such/template.jinja")
    assert "neither a file nor a Jinja template" in str(exc.value.code)


def test_http_port_from_the_config_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": "/models/m", "router": {"http-port": 8080, "served-model-name": "x"}}))
    router = cli.serve_config_from_args(cli.parse_args(["up", "--config", str(path)])).router
    assert (router.http_port, router.served_model_name) == (8080, "x")


def test_the_deployed_config_serves_http():
    doc = yaml.safe_load((REPO / "deploy" / "config" / "serve.yaml").read_text())
    assert doc["router"]["http-port"] == 8000


def test_batch_limits_default_to_vllms_choice_and_eager_is_a_flag():
    engine = config().engine
    assert engine.max_num_seqs is None and engine.max_num_batched_tokens is None
    assert "max_num_seqs" not in engine.engine_kwargs() and "max_num_batched_tokens" not in engine.engine_kwargs()
    assert config("--max-num-seqs", "32").engine.engine_kwargs()["max_num_seqs"] == 32
    assert engine.enforce_eager is True and config("--no-enforce-eager").engine.enforce_eager is False
    assert EngineConfig(model="m").engine_kwargs()["enforce_eager"] is True
