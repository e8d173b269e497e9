"""The widened benchmark target (cluster/models/widened.py) computes exactly its base model's
logits with more layers: checked with transformers on a tiny random Llama (no vLLM)."""

from __future__ import annotations

import json

import torch

from cluster.models.widened import build_widened_target


def tiny_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path))
    return model


def test_widened_model_has_more_layers_and_the_same_logits(tmp_path):
    from transformers import LlamaForCausalLM

    base = tiny_llama(tmp_path / "demo" / "target")
    out = build_widened_target(tmp_path / "demo", extra_layers=3, out_dir=tmp_path / "cache", progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    wide = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    layer = wide.model.layers[4]
    assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    assert layer.self_attn.q_proj.weight.abs().sum() > 0  # the extra layers really compute
    ids = torch.randint(3, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, wide(ids).logits)
    # Cached: a second call returns the same directory without rebuilding.
    again = build_widened_target(tmp_path / "demo", extra_layers=3, out_dir=tmp_path / "cache", progress=False)
    assert again == out
