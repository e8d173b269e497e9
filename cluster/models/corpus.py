"""The demo models' training corpus: the Python standard library's own *.py files, listed in a
fixed order and split by a hash of their path into training and held-out texts."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

from cluster.models.recipe import DemoRecipe

# Stdlib folders that are tests, generated tables or GUI demos rather than ordinary code.
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "turtledemo",
        "pydoc_data",
        "encodings",
        "ensurepip",
        "lib-dynload",
    }
)
_EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus_files(root: str | Path | None = None) -> list[Path]:
    """All eligible stdlib *.py files, sorted by their path relative to root."""
    root = Path(root) if root is not None else stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS or part.startswith(_EXCLUDED_PREFIXES) for part in rel.parts):
            continue
        if path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _path_key(path: Path, root: Path) -> int:
    return zlib.crc32(path.relative_to(root).as_posix().encode())


def split_corpus(recipe: DemoRecipe, root: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) texts; held-out files never reach the tokenizer."""
    root = Path(root) if root is not None else stdlib_dir()
    # Hash order mixes packages, so the byte cap doesn't keep only names starting with 'a'..'e'.
    files = sorted(list_corpus_files(root), key=lambda p: (_path_key(p, root), p.as_posix()))
    train, held, n_train, n_held = [], [], 0, 0
    for path in files:
        if path.stat().st_size > recipe.max_file_bytes:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if _path_key(path, root) % recipe.holdout_mod == 0:
            if n_held < recipe.eval_max_bytes:
                held.append(text)
                n_held += len(text)
        elif n_train < recipe.corpus_max_bytes:
            train.append(text)
            n_train += len(text)
    return train, held
