"""The demo build's recipe: every knob of the tokenizer, target and draft, and the hashes
that name their cache directories (the tokenizer's covers only the fields that shape it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cluster.models.cache import hash_payload


@dataclass(frozen=True)
class DemoRecipe:
    """Every knob of the demo build; its hash names the cache directory."""

    # Bump when the code changes what gets built, so stale caches are not reused.
    version: str = "2"
    seed: int = 0
    # Corpus: stdlib *.py files in a hash order, capped for speed.
    corpus_max_bytes: int = 3_000_000
    max_file_bytes: int = 150_000
    holdout_mod: int = 16  # a file is held out when crc32(path) % holdout_mod == 0
    eval_max_bytes: int = 300_000
    # Tokenizer.
    vocab_size: int = 4096
    min_frequency: int = 2
    model_max_length: int = 1024
    # Target model (GQA: 4 query heads share 2 KV heads).
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Target training.
    seq_len: int = 128
    # Small batches, many steps: on a tiny budget more updates beat bigger batches.
    batch_size: int = 8
    target_steps: int = 600
    target_lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    # Draft distillation.
    draft_layers: int = 1
    draft_steps: int = 250
    draft_lr: float = 2e-3
    distill_temperature: float = 1.0
    # Evaluation.
    eval_seqs: int = 48


# Fields that decide the tokenizer; it is cached on its own so random models can reuse it.
_TOKENIZER_FIELDS = (
    "version",
    "corpus_max_bytes",
    "max_file_bytes",
    "holdout_mod",
    "eval_max_bytes",
    "vocab_size",
    "min_frequency",
    "model_max_length",
)


def recipe_hash(recipe: DemoRecipe) -> str:
    return hash_payload(asdict(recipe))


def tokenizer_hash(recipe: DemoRecipe) -> str:
    fields = asdict(recipe)
    return hash_payload({"tokenizer": {k: fields[k] for k in _TOKENIZER_FIELDS}})
