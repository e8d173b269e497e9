"""What a benchmark sends: when requests arrive, how long prompts and outputs are, and the
prompts themselves.

Prompts are cut from the Python standard library's source (real text, no data set to download)
in three forms, one function each:

    corpus_passages        text sized by a characters-per-token ratio (lengths approximate)
    corpus_passages_exact  text that tokenizes to an exact length (a local copy of the tokenizer)
    corpus_token_prompts   token ids of an exact length (the comparison studies)

or are random token ids (random_prompts). Everything here is pure, seeded and unit tested.
"""

from __future__ import annotations

import math
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- arrivals and lengths


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (s, from the start) of n requests; the first is sent at 0.

    Inter-arrival gaps are gamma(shape=B, scale=1/(R*B)): mean 1/R for every B, and B=1 is the
    exponential gap of a Poisson process. An infinite rate sends everything at once."""
    if n <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def sample_lengths(n: int, mean: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """n integer lengths uniform in [mean*(1-r), mean*(1+r)], never below 1."""
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


# ---------------------------------------------------------------- prompts


@dataclass
class Prompt:
    prompt: str | list[int]
    input_len: int  # target; the server's usage says what it really was
    output_len: int


_corpus_cache: dict[int, str] = {}


def stdlib_corpus(max_chars: int = 2_000_000) -> str:
    """Python source text of the standard library, files in sorted order, up to max_chars.

    Third-party packages and the test suites (odd encodings, huge data literals) are skipped, so
    the text depends only on the Python version."""
    if max_chars not in _corpus_cache:
        _corpus_cache[max_chars] = _read_stdlib(max_chars)
    return _corpus_cache[max_chars]


def _read_stdlib(max_chars: int) -> str:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            parts.append(text)
            total += len(text)
            if total >= max_chars:
                return "\n".join(parts)
    return "\n".join(parts)


def cut_corpus(text: str, num_chars: int, rng: np.random.Generator) -> str:
    """A passage of num_chars characters starting at a random line start."""
    num_chars = min(num_chars, len(text))
    start = int(rng.integers(0, len(text) - num_chars + 1))
    line_start = text.rfind("\n", 0, start) + 1  # back up to whole lines: reads like real code
    return text[line_start:line_start + num_chars]


def corpus_passages(input_lens, output_lens, chars_per_token: float,
                    rng: np.random.Generator, text: str | None = None) -> list[Prompt]:
    """Passages sized by an average characters-per-token ratio (lengths are approximate)."""
    text = text if text is not None else stdlib_corpus()
    return [Prompt(cut_corpus(text, max(1, round(n * chars_per_token)), rng), int(n), int(m))
            for n, m in zip(input_lens, output_lens, strict=True)]


def cut_corpus_tokens(text: str, num_tokens: int, tokenizer, rng: np.random.Generator) -> str:
    """A passage that tokenizes to num_tokens tokens, special tokens (BOS) included; a token or
    so off where the cut splits a word. `tokenizer`: a `tokenizers.Tokenizer`."""
    specials = len(tokenizer.encode("", add_special_tokens=True).ids)
    want = max(1, num_tokens - specials)
    passage = cut_corpus(text, want * 8 + 64, rng)  # code averages well under 8 chars a token
    enc = tokenizer.encode(passage, add_special_tokens=False)
    if len(enc.ids) <= want:
        return passage
    return passage[:enc.offsets[want - 1][1]]


def corpus_passages_exact(input_lens, output_lens, tokenizer, rng: np.random.Generator,
                          text: str | None = None) -> list[Prompt]:
    """Passages that tokenize to their target lengths with `tokenizer` (the server's own)."""
    text = text if text is not None else stdlib_corpus()
    return [Prompt(cut_corpus_tokens(text, int(n), tokenizer, rng), int(n), int(m))
            for n, m in zip(input_lens, output_lens, strict=True)]


def corpus_token_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids cut from the standard library's source.
    `tokenizer`: the serving (Hugging Face) tokenizer; no special tokens are added."""
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


def random_token_ids(lengths, vocab_size: int, exclude: set[int],
                     rng: np.random.Generator) -> list[list[int]]:
    """Random token ids, one list per length, avoiding special ids (EOS/BOS) that would change
    what the model does."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(exclude, dtype=np.int64))
    return [rng.choice(allowed, size=int(n)).tolist() for n in lengths]


def random_prompts(input_lens, output_lens, vocab_size: int, exclude: set[int],
                   rng: np.random.Generator) -> list[Prompt]:
    """Prompts of random token ids (exact lengths), special ids left out."""
    ids = random_token_ids(input_lens, vocab_size, exclude, rng)
    return [Prompt(p, int(n), int(m)) for p, n, m in zip(ids, input_lens, output_lens, strict=True)]
