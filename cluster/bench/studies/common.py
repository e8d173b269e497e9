"""What the comparison studies share: their default model and where their results go."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out_dir: str | Path, name: str, results: dict) -> Path:
    """results as out_dir/name.json; the path (its .png sibling is the study's plot)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path
