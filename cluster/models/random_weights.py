"""Random-weight Llama models with real shapes (presets), for speed and KV-size studies: no
training, the demo tokenizer, cached under a directory named by a hash of the preset and seed.

`torch` and `transformers` are imported inside the functions that build the model, so that
importing this module (the CLI) stays cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.models.cache import cached_build, default_models_dir, hash_payload
from cluster.models.checkpoint import progress_bars, save_model
from cluster.models.recipe import DemoRecipe, tokenizer_hash
from cluster.models.tokenizer import BOS, EOS, PAD, build_tokenizer, load_tokenizer_file


@dataclass(frozen=True)
class RandomPreset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    dtype: str


RANDOM_PRESETS: dict[str, RandomPreset] = {
    # Llama-3.2-1B's shape, with the demo tokenizer's small vocabulary.
    "llama-1b": RandomPreset(2048, 16, 32, 8, 8192, 8192, 500000.0, True, "bfloat16"),
    "tiny": RandomPreset(128, 2, 4, 2, 344, 1024, 10000.0, False, "float32"),
    # Long-context KV at cheap compute (migration benchmarks): 8192 positions, 64 KiB of KV
    # per token (16 layers x 8 KV heads x 64 dims x K,V x 4 bytes), ~45M parameters.
    "kv-heavy": RandomPreset(512, 16, 8, 8, 1024, 8192, 10000.0, False, "float32"),
}
_RANDOM_VERSION = "1"


def _random_config(preset: RandomPreset, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rope_theta=preset.rope_theta,
        rms_norm_eps=1e-5,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        tie_word_embeddings=preset.tie_word_embeddings,
        torch_dtype=preset.dtype,
    )


def _random_llama(config, dtype, seed: int):
    """Allocate on 'meta' (free), then fill each tensor once: no costly default init."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    # Non-persistent buffers (rotary inv_freq) stay uninitialised: they are not saved.
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def write_random_model(
    out_dir: str | Path, preset: str = "llama-1b", *, seed: int = 0, progress: bool = True
) -> Path:
    """Random-weight Llama of a preset's shape, cached at out_dir/random-<preset>-<hash>/."""
    import torch

    spec = RANDOM_PRESETS[preset]
    root = Path(out_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    tok_recipe = DemoRecipe()
    key = {
        "random": asdict(spec),
        "preset": preset,
        "seed": seed,
        "version": _RANDOM_VERSION,
        "tokenizer": tokenizer_hash(tok_recipe),
    }

    def build(tmp: Path) -> None:
        # The same tokenizer as the demo models (deterministic, shared cache).
        tok_dir = build_tokenizer(default_models_dir(), tok_recipe, progress=progress)
        tok = load_tokenizer_file(tok_dir)
        model = _random_llama(_random_config(spec, tok), getattr(torch, spec.dtype), seed)
        with progress_bars(progress):
            save_model(model, tmp, tok_dir)

    return cached_build(root, f"random-{preset}-{hash_payload(key)}", build)
