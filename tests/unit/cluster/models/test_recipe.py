"""Fast checks of the demo-model recipe and corpus plumbing (no training)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.models.cache import DONE, cached_build, default_models_dir
from cluster.models.corpus import list_corpus_files, split_corpus, stdlib_dir
from cluster.models.recipe import DemoRecipe, recipe_hash, tokenizer_hash
from tests import REPO


def test_recipe_hash_is_stable_within_a_process():
    assert recipe_hash(DemoRecipe()) == recipe_hash(DemoRecipe())
    digest = recipe_hash(DemoRecipe())
    assert len(digest) == 12 and int(digest, 16) >= 0


def test_recipe_hash_is_stable_across_processes():
    # Different hash seeds must not matter: the name of the cache dir is shared by processes.
    code = (
        "from cluster.models.recipe import DemoRecipe, recipe_hash; "
        "print(recipe_hash(DemoRecipe()))"
    )
    seen = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        seen.add(out.stdout.strip())
    assert seen == {recipe_hash(DemoRecipe())}


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_size": 128},
        {"target_steps": 1},
        {"seed": 1},
        {"version": "other"},
        {"distill_temperature": 2.0},
    ],
)
def test_recipe_hash_changes_with_any_hyperparameter(change):
    base = DemoRecipe()
    assert recipe_hash(dataclasses.replace(base, **change)) != recipe_hash(base)


def test_tokenizer_hash_ignores_model_hyperparameters():
    base = DemoRecipe()
    assert tokenizer_hash(dataclasses.replace(base, num_layers=8)) == tokenizer_hash(base)
    assert tokenizer_hash(dataclasses.replace(base, vocab_size=2048)) != tokenizer_hash(base)


def test_recipe_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DemoRecipe().seed = 3  # type: ignore[misc]


def test_corpus_listing_is_deterministic_sorted_and_clean():
    root = stdlib_dir()
    files = list_corpus_files()
    assert files, "no stdlib sources found"
    assert files == list_corpus_files()
    rels = [f.relative_to(root).as_posix() for f in files]
    assert rels == sorted(rels)
    assert all(r.endswith(".py") for r in rels)
    for excluded in ("test", "idlelib", "lib2to3", "site-packages"):
        assert not any(excluded in Path(r).parts for r in rels), excluded


def test_corpus_split_is_deterministic_and_disjoint():
    recipe = DemoRecipe()
    train, held = split_corpus(recipe)
    assert (train, held) == split_corpus(recipe)
    assert train and held
    assert sum(map(len, train)) <= recipe.corpus_max_bytes + recipe.max_file_bytes
    assert not set(train) & set(held)


def test_default_models_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DISAGG_MODELS_DIR", str(tmp_path))
    assert default_models_dir() == tmp_path
    monkeypatch.delenv("DISAGG_MODELS_DIR")
    assert default_models_dir() == Path.home() / ".cache" / "disagg-serve" / "models"


def test_cached_build_runs_once_and_marks_done(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "payload").write_text("x")

    first = cached_build(tmp_path, "thing", build)
    second = cached_build(tmp_path, "thing", build)
    assert first == second == tmp_path.resolve() / "thing"
    assert len(calls) == 1
    assert (first / DONE).is_file() and (first / "payload").read_text() == "x"


def test_interrupted_build_leaves_nothing_complete(tmp_path):
    def boom(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_build(tmp_path, "thing", boom)
    assert not (tmp_path / "thing").exists()
    assert not list(tmp_path.glob(".tmp-thing-*"))
