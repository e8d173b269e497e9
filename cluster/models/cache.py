"""The on-disk cache of built models: a directory per artifact, named by a hash of its recipe.

A build goes to a temp dir that is renamed into place after a ``DONE`` marker is written,
under a file lock, so parallel callers build once and an interrupted build never looks
complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

DONE = "DONE"


def hash_payload(payload: dict) -> str:
    """12 hex digits naming a cache directory: stable across processes, per Python version."""
    payload = {**payload, "python": list(sys.version_info[:2])}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_models_dir() -> Path:
    """$DISAGG_MODELS_DIR, else ~/.cache/disagg-serve/models (same rule as cluster.config)."""
    return Path(os.environ.get("DISAGG_MODELS_DIR") or Path.home() / ".cache/disagg-serve/models")


def progress_logger(progress: bool) -> Callable[[str], None]:
    """A build's progress lines on stderr, or nothing when progress is off."""

    def log(msg: str) -> None:
        if progress:
            print(f"[models] {msg}", file=sys.stderr, flush=True)

    return log


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _make_readable(root: Path) -> None:
    """Some writers (mkdtemp, safetensors) create owner-only files; caches are shared."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def is_complete(path: Path) -> bool:
    return (path / DONE).is_file()


def cached_build(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return root/name, building it with build(tmp_dir) first unless already complete."""
    root = Path(root).expanduser().resolve()
    final = root / name
    if is_complete(final):
        return final
    with _file_lock(root / f".{name}.lock"):
        if is_complete(final):  # another process finished it while we waited
            return final
        # Holding the lock, anything left over is debris of an interrupted build.
        if final.exists():
            shutil.rmtree(final)
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            build(tmp)
            _make_readable(tmp)
            (tmp / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
            os.rename(tmp, final)  # atomic: readers see all or nothing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
