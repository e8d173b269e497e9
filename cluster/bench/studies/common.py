"""What the comparison studies share: corpus prompts, output files."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path


def corpus_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of exactly `length` tokens cut from the standard library's source."""
    import random

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        text = rng.choice(files).read_text(errors="replace")
        if len(text) < 16 * length:
            continue
        start = rng.randrange(0, len(text) - 8 * length)
        ids = tokenizer.encode(text[start:start + 8 * length], add_special_tokens=False)
        if len(ids) >= length:
            prompts.append(ids[:length])
    return prompts


def write_results(out_dir: str | Path, name: str, results: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path
