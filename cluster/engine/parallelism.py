"""Checks that a deployment's pools can run with their tensor-parallel degrees, made before any
engine starts (a clear error, not a failure deep inside vLLM or at the first transfer), and that
the pools that exchange KV have interchangeable layouts once they run."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.config import ServeConfig
from cluster.kv.heads import HeadLayoutError, check_tp


class ParallelismError(ValueError):
    """A pool's TP degree does not fit its model, or two pools' KV layouts cannot be exchanged."""


def model_heads(model_dir: str) -> tuple[int, int]:
    """(attention heads, KV heads) from a Hugging Face model directory's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ParallelismError(f"cannot read {path}: {exc}") from exc
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    heads = int(text["num_attention_heads"])
    return heads, int(text.get("num_key_value_heads") or heads)


def check_pools(config: ServeConfig) -> None:
    """Every pool's TP degree must split the model's attention heads and split (or replicate) its
    KV heads, for the target and, where the pool speculates, the draft model."""
    models = [("model", config.engine.model)]
    if config.spec.enabled:
        models.append(("draft model", config.spec.draft_model))
    for pool in config.pools:
        tp = pool.tensor_parallel_size
        if tp == 1 or pool.num_instances == 0:
            continue
        for what, model in models:
            heads, kv_heads = model_heads(model)
            if heads % tp:
                raise ParallelismError(f"the {pool.role} pool's TP degree {tp} does not divide the {what}'s "
                                       f"{heads} attention heads ({model})")
            try:
                check_tp(kv_heads, tp)
            except HeadLayoutError as exc:
                raise ParallelismError(f"the {pool.role} pool's TP degree {tp} cannot shard the {what}'s KV "
                                       f"heads: {exc} ({model})") from exc


def check_kv_exchange(source_role: str, source_ranks: list, dest_role: str, dest_ranks: list) -> None:
    """Two pools' engines (their RankEndpoints) must agree on the KV layout: the same layers,
    dtype, block and head geometry, whatever their TP degrees."""
    if not source_ranks or not dest_ranks:
        raise ParallelismError(f"the {source_role} or {dest_role} pool published no KV endpoints")
    src, dst = source_ranks[0], dest_ranks[0]
    if src.total_kv_heads != dst.total_kv_heads:
        raise ParallelismError(f"the {source_role} pool's model has {src.total_kv_heads} KV heads, the "
                               f"{dest_role} pool's {dst.total_kv_heads}: they cannot exchange KV")
    if tuple(src.signature) != tuple(dst.signature):
        diff = next(((a, b) for a, b in zip(src.signature, dst.signature, strict=False) if a != b), None)
        detail = f"first difference {diff}" if diff else (f"{len(src.signature)} layers vs "
                                                          f"{len(dst.signature)}")
        raise ParallelismError(f"the {source_role} and {dest_role} pools' KV caches differ (model, dtype or "
                               f"block size): {detail}")
    if src.tp_size != dst.tp_size and (not src.local_kv_heads or not dst.local_kv_heads):
        raise ParallelismError(f"the {source_role} (TP{src.tp_size}) and {dest_role} (TP{dst.tp_size}) pools "
                               "differ in TP degree, which needs one KV head count for every layer")
