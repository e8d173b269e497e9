"""Loading tokenizers: the serving one (the router's detokenizer, the benchmarks) and the raw
`tokenizers` file (training the demo models, sizing benchmark prompts)."""

from __future__ import annotations

from pathlib import Path


def load_serving_tokenizer(model: str | Path):
    """The model directory's Hugging Face tokenizer, as vLLM's own front end loads it."""
    from transformers import AutoTokenizer  # heavy: only the processes that detokenize need it

    return AutoTokenizer.from_pretrained(str(model))


def load_tokenizer_file(model: str | Path):
    """The fast tokenizer saved in `model`/tokenizer.json (the `tokenizers` library's own)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
