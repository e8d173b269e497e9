import json

import pytest

from cluster.config import EngineConfig, PoolConfig, ServeConfig, SpecConfig
from cluster.engine.parallelism import ParallelismError, check_kv_exchange, check_pools
from cluster.kv.connector.metadata import RankEndpoint


def model(tmp_path, name, heads, kv_heads):
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads}))
    return str(path)


def serve(tmp_path, heads=4, kv_heads=2, draft=None, **tps):
    pools = tuple(PoolConfig(role, 1, tensor_parallel_size=tps.get(role, 1)) for role in ("prefill", "decode"))
    return ServeConfig(engine=EngineConfig(model=model(tmp_path, "target", heads, kv_heads)), pools=pools,
                       spec=SpecConfig(draft_model=draft))


def test_degrees_that_split_the_heads_pass(tmp_path):
    check_pools(serve(tmp_path, prefill=2, decode=1))
    check_pools(serve(tmp_path, heads=8, kv_heads=2, prefill=4, decode=2))  # KV heads replicated on TP4


@pytest.mark.parametrize("heads, kv_heads, tp, words", [(4, 2, 3, "attention heads"), (6, 3, 2, "KV heads"),
                                                       (8, 3, 4, "KV heads")])
def test_unfit_degrees_are_refused_before_anything_starts(tmp_path, heads, kv_heads, tp, words):
    with pytest.raises(ParallelismError, match=words):
        check_pools(serve(tmp_path, heads=heads, kv_heads=kv_heads, decode=tp))


def test_the_draft_model_must_fit_too(tmp_path):
    draft = model(tmp_path, "draft", 3, 3)
    with pytest.raises(ParallelismError, match="draft model"):
        check_pools(serve(tmp_path, draft=draft, decode=2))


def endpoint(tp, signature=(("l0", ("*", "*", 16, 8), "float32"),), total=2):
    return RankEndpoint(0, tp, "h", 1, 1, total, total // tp, signature)


def test_kv_exchange_needs_the_same_layers_and_heads():
    check_kv_exchange("prefill", [endpoint(2)], "decode", [endpoint(1)])
    with pytest.raises(ParallelismError, match="KV heads"):
        check_kv_exchange("prefill", [endpoint(1, total=4)], "decode", [endpoint(1)])
    with pytest.raises(ParallelismError, match="differ"):
        check_kv_exchange("prefill", [endpoint(1, (("l0", ("*", "*", 16, 8), "bfloat16"),))], "decode",
                          [endpoint(1)])
