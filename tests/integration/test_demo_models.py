"""Builds the demo models once per machine (shared default cache) and checks what was saved."""

from __future__ import annotations

import json

import pytest

from cluster.models.cache import DONE
from cluster.models.demo import build_demo_models
from cluster.models.random_weights import write_random_model
from cluster.models.recipe import DemoRecipe, recipe_hash
from cluster.models.tokenizer import BOS, EOS, SPECIAL_TOKENS, load_tokenizer_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

SNIPPET = (
    'def main(argv=None):\n    """Entry point."""\n\tvalues = {"α": 1, \'b\': [2, 3]}  # ünï €\n'
    "    return sum(v for v in values.values() if v)\n\n"
)


@pytest.fixture(scope="session")
def demo_dir():
    # Same default cache as the CLI: the first run on a machine pays the few-minute build.
    return build_demo_models()


@pytest.mark.parametrize("role", ["target", "draft"])
def test_layout(demo_dir, role):
    d = demo_dir / role
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (d / name).is_file(), name
    assert (demo_dir / DONE).is_file()


def test_configs_fit_speculative_decoding(demo_dir):
    target = json.loads((demo_dir / "target" / "config.json").read_text())
    draft = json.loads((demo_dir / "draft" / "config.json").read_text())
    assert target["architectures"] == draft["architectures"] == ["LlamaForCausalLM"]
    assert target["vocab_size"] == draft["vocab_size"]
    assert target["num_key_value_heads"] < target["num_attention_heads"]  # GQA
    assert draft["num_hidden_layers"] < target["num_hidden_layers"]
    tok = load_tokenizer_file(demo_dir / "target")
    assert tok.get_vocab_size() == target["vocab_size"]
    assert target["bos_token_id"] == tok.token_to_id(BOS)
    assert target["eos_token_id"] == tok.token_to_id(EOS)


@pytest.mark.parametrize("role", ["target", "draft"])
def test_tokenizer_round_trips_python(demo_dir, role):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir / role))
    ids = tok.encode(SNIPPET, add_special_tokens=False)
    assert tok.decode(ids) == SNIPPET
    with_bos = tok.encode("def main(")
    assert with_bos[0] == tok.bos_token_id
    assert tok.decode(with_bos, skip_special_tokens=True) == "def main("
    assert {tok.bos_token, tok.eos_token, tok.pad_token} == set(SPECIAL_TOKENS)


def test_recipe_metrics(demo_dir):
    record = json.loads((demo_dir / "recipe.json").read_text())
    assert record["hash"] == recipe_hash(DemoRecipe())
    assert demo_dir.name == f"demo-{record['hash']}"
    metrics = record["metrics"]
    assert metrics["top1_agreement"] >= 0.5
    assert metrics["target_eval_loss"] < metrics["draft_eval_loss"] + 0.5
    assert metrics["target_eval_loss"] < 7.0  # well below uniform, ln(4096) = 8.3


def test_second_call_is_cached(demo_dir):
    mtime = (demo_dir / DONE).stat().st_mtime
    assert build_demo_models(progress=False) == demo_dir
    assert (demo_dir / DONE).stat().st_mtime == mtime


def test_tiny_random_model(tmp_path):
    out = write_random_model(tmp_path, "tiny", seed=0, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 128 and cfg["num_hidden_layers"] == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert write_random_model(tmp_path, "tiny", seed=0, progress=False) == out
    assert write_random_model(tmp_path, "tiny", seed=1, progress=False) != out
