"""The TETRIS/SmartSpec study's summary (cluster/bench/studies/tetris.py): goal checks on fake rows."""

from __future__ import annotations

import pytest

from cluster.bench.studies.tetris import summarize


def row(mode, tok_s, batch=8, rep=0, accepted=0, verified=0, steps=10, no_spec=0):
    return {"regime": "demo", "kind": "batch", "batch": batch, "mode": mode, "repeat": rep,
            "tokens_per_s": tok_s, "tpot_p50_ms": 10.0, "tpot_p99_ms": 20.0, "accepted": accepted,
            "verified": verified, "steps": steps, "steps_without_speculation": no_spec}


def test_goals_use_medians_over_repeats_and_pooled_acceptance():
    rows = [row("no-spec", 1000, rep=0), row("no-spec", 900, rep=1), row("no-spec", 2000, rep=2),
            row("standard", 500, accepted=30, verified=100), row("tetris-fixed", 480, accepted=36, verified=100),
            row("tetris-goodput", 980, accepted=1, verified=2, no_spec=9)]
    (entry,) = summarize({"rows": rows})
    assert entry["modes"]["no-spec"]["tokens_per_s"] == 1000  # median of 900, 1000, 2000
    assert entry["best_other"] == "no-spec"
    assert entry["goodput_vs_best"] == pytest.approx(0.98) and entry["goodput_goal_met"]
    assert entry["accept_vs_standard"] == pytest.approx(1.2) and entry["accept_goal_met"]
    assert entry["modes"]["tetris-goodput"]["no_spec_step_share"] == pytest.approx(0.9)


def test_goal_missed_and_small_batches_skip_the_acceptance_goal():
    rows = [row("no-spec", 1000, batch=4), row("standard", 500, batch=4, accepted=3, verified=10),
            row("tetris-fixed", 400, batch=4, accepted=3, verified=10), row("tetris-goodput", 900, batch=4)]
    (entry,) = summarize({"rows": rows})
    assert not entry["goodput_goal_met"] and "accept_vs_standard" not in entry
