"""Writing a model directory that vLLM and transformers can load: safetensors weights, config,
generation config and the tokenizer's files (shared by the demo and the random models).

`transformers` is imported inside the functions, so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.models.tokenizer import copy_tokenizer


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers draws its own save bars; silence them when progress is off."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def save_model(model, out: Path, tok_dir: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    # transformers >= 5 always writes safetensors (the safe_serialization flag is gone).
    model.save_pretrained(str(out))
    if not (out / "model.safetensors").exists():
        raise RuntimeError(f"save_pretrained wrote no model.safetensors in {out}")
    cfg = model.config
    GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    ).save_pretrained(str(out))
    copy_tokenizer(tok_dir, out)
