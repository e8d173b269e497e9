"""Tokenizers: loading the serving one (the router's detokenizer, the benchmarks) and the raw
`tokenizers` file (training the demo models, sizing benchmark prompts), and training the demo
models' byte-level BPE tokenizer on the corpus, cached by its own recipe hash.

`tokenizers` and `transformers` are imported inside the functions that use them, so that
importing this module (the CLI, the router) stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from cluster.models.cache import cached_build, default_models_dir, progress_logger
from cluster.models.corpus import split_corpus
from cluster.models.recipe import DemoRecipe, tokenizer_hash

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The demo models' chat template (tokenizer_config.json `chat_template`): the models know
# Python, so a conversation is written as Python comments and the reply continues as code.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "# {{ message['role'] }}: {{ message['content'] | replace('\n', '\n# ') }}\n"
    "{% endfor %}{% if add_generation_prompt %}# assistant:\n{% endif %}"
)


def load_serving_tokenizer(model: str | Path):
    """The model directory's Hugging Face tokenizer, as vLLM's own front end loads it."""
    from transformers import AutoTokenizer  # heavy: only the processes that detokenize need it

    return AutoTokenizer.from_pretrained(str(model))


def load_tokenizer_file(model: str | Path):
    """The fast tokenizer saved in `model`/tokenizer.json (the `tokenizers` library's own)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model) / "tokenizer.json"))


def _train_tokenizer(texts: list[str], recipe: DemoRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(s)) must give s back byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=recipe.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prompts start with BOS, as every training sequence does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _save_tokenizer(tok, out: Path, recipe: DemoRecipe) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=recipe.model_max_length,
    )
    hf_tok.save_pretrained(str(out))
    # transformers 5 writes its new class name "TokenizersBackend"; the old alias loads in
    # both 4.x and 5.x.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = DEMO_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    # Newer transformers no longer write this file; older loaders still look for it.
    special_map = out / "special_tokens_map.json"
    if not special_map.exists():
        special_map.write_text(
            json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n"
        )


def build_tokenizer(
    out_dir: str | Path | None = None, recipe: DemoRecipe | None = None, *, progress: bool = True
) -> Path:
    """Train (or reuse) the demo tokenizer; returns out_dir/tokenizer-<hash>/."""
    recipe = recipe or DemoRecipe()
    root = Path(out_dir) if out_dir is not None else default_models_dir()
    log = progress_logger(progress)

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        train, _ = split_corpus(recipe)
        tok = _train_tokenizer(train, recipe)
        _save_tokenizer(tok, tmp, recipe)
        log(
            f"tokenizer: {tok.get_vocab_size()} tokens from {sum(map(len, train)) / 1e6:.1f} MB "
            f"in {time.perf_counter() - t0:.1f}s"
        )

    return cached_build(root, f"tokenizer-{tokenizer_hash(recipe)}", build)


def ensure_chat_template(model_dir: Path) -> None:
    """Gives a demo tokenizer built before the template existed its chat template, in place.

    The template changes no token and no weight, so the build caches keep their hashes; the
    file is replaced atomically, so a concurrent reader sees the old or the new one whole."""
    config_path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("chat_template") == DEMO_CHAT_TEMPLATE:
        return
    config["chat_template"] = DEMO_CHAT_TEMPLATE
    tmp = config_path.with_name(f".{config_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, config_path)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files of src into dst (a model directory must carry its tokenizer)."""
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, dst / name)
