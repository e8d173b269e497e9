"""TETRIS selection (decode_worker/tetris.py) against a brute-force optimum, plus edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from decode_worker.tetris import (
    TetrisConfig,
    draft_scores,
    expected_accepted,
    plan,
    select_draft_lengths,
)


def random_log_probs(rng: np.random.Generator, n: int, m: int, p_neg_inf: float = 0.0) -> np.ndarray:
    lp = np.log(rng.uniform(0.0, 1.0, size=(n, m)) ** rng.uniform(0.2, 3.0))
    lp[rng.uniform(size=(n, m)) < p_neg_inf] = -np.inf
    return lp


def brute_force_best(log_probs: np.ndarray, capacity: int, valid=None) -> float:
    n, m = log_probs.shape
    valid = [m] * n if valid is None else list(valid)
    best = 0.0
    for lengths in itertools.product(*(range(v + 1) for v in valid)):
        if sum(lengths) <= capacity:
            best = max(best, expected_accepted(log_probs, lengths))
    return best


def assert_is_prefix_selection(log_probs, lengths, capacity, valid=None):
    n, m = log_probs.shape
    valid = np.full(n, m) if valid is None else np.asarray(valid)
    assert lengths.dtype == np.int64 and lengths.shape == (n,)
    assert (lengths >= 0).all() and (lengths <= valid).all()
    assert lengths.sum() <= capacity
    # Nothing chosen has score -inf (so the prefix of each request is all finite).
    scores = draft_scores(log_probs)
    for i in range(n):
        assert np.isfinite(scores[i, : lengths[i]]).all()


@pytest.mark.parametrize("seed", range(60))
def test_matches_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    m = int(rng.integers(1, 5))
    lp = random_log_probs(rng, n, m, p_neg_inf=0.15 if seed % 3 == 0 else 0.0)
    valid = rng.integers(0, m + 1, size=n) if seed % 4 == 1 else None
    for capacity in range(n * m + 2):
        lengths = select_draft_lengths(lp, capacity, valid_lengths=valid)
        assert_is_prefix_selection(lp, lengths, capacity, valid)
        got = expected_accepted(lp, lengths)
        assert got == pytest.approx(brute_force_best(lp, capacity, valid), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(20))
def test_uses_all_capacity_when_enough_finite_positions(seed):
    rng = np.random.default_rng(1000 + seed)
    n, m = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    lp = random_log_probs(rng, n, m)
    for capacity in range(n * m + 3):
        assert select_draft_lengths(lp, capacity).sum() == min(capacity, n * m)


def test_prefix_is_the_top_capacity_positions():
    lp = np.log(np.array([[0.9, 0.9, 0.9], [0.5, 0.99, 0.99], [0.2, 0.9, 0.9]]))
    # scores: r0 .9 .81 .729 ; r1 .5 .495 .490 ; r2 .2 .18 .162
    assert select_draft_lengths(lp, 3).tolist() == [3, 0, 0]
    assert select_draft_lengths(lp, 4).tolist() == [3, 1, 0]
    assert select_draft_lengths(lp, 6).tolist() == [3, 3, 0]
    assert select_draft_lengths(lp, 7).tolist() == [3, 3, 1]


def test_single_request():
    lp = np.log(np.array([[0.5, 0.5, 0.5, 0.5]]))
    for c in range(6):
        assert select_draft_lengths(lp, c).tolist() == [min(c, 4)]


def test_zero_capacity_and_empty_inputs():
    lp = np.zeros((3, 4))
    assert select_draft_lengths(lp, 0).tolist() == [0, 0, 0]
    assert select_draft_lengths(np.zeros((0, 4)), 5).tolist() == []
    assert select_draft_lengths(np.zeros((2, 0)), 5).tolist() == [0, 0]
    with pytest.raises(ValueError):
        select_draft_lengths(lp, -1)
    with pytest.raises(ValueError):
        select_draft_lengths(np.zeros(4), 2)


def test_capacity_at_least_everything_chooses_everything():
    rng = np.random.default_rng(7)
    lp = random_log_probs(rng, 4, 3)
    for c in (12, 13, 100):
        assert select_draft_lengths(lp, c).tolist() == [3, 3, 3, 3]
    valid = [0, 1, 2, 3]
    assert select_draft_lengths(lp, 100, valid_lengths=valid).tolist() == valid


def test_equal_scores_are_deterministic_and_documented():
    lp = np.full((3, 3), np.log(0.5))
    # Ranking (score desc, position asc, row asc): (0,0) (1,0) (2,0) (0,1) (1,1) ...
    expected = {0: [0, 0, 0], 1: [1, 0, 0], 2: [1, 1, 0], 3: [1, 1, 1], 4: [2, 1, 1],
                5: [2, 2, 1], 9: [3, 3, 3]}
    for c, want in expected.items():
        assert select_draft_lengths(lp, c).tolist() == want
        assert select_draft_lengths(lp, c).tolist() == want  # same call, same answer
    # All-zero log-probs (probability 1 everywhere): same rule.
    assert select_draft_lengths(np.zeros((3, 3)), 4).tolist() == [2, 1, 1]


def test_permuted_rows_permute_the_result_except_exact_ties():
    rng = np.random.default_rng(3)
    lp = random_log_probs(rng, 4, 4)  # continuous values: no exact ties
    perm = np.array([2, 0, 3, 1])
    for c in range(18):
        base = select_draft_lengths(lp, c)
        assert select_draft_lengths(lp[perm], c).tolist() == base[perm].tolist()
    # An exact tie across rows straddling the capacity goes to the lower row, whatever the
    # rows' identity: rows A and B are identical, so both orders give [1, 0] + the rest.
    a = np.log([0.9, 0.8])
    b = np.log([0.9, 0.8])
    assert select_draft_lengths(np.stack([a, b]), 3).tolist() == [2, 1]
    assert select_draft_lengths(np.stack([b, a]), 3).tolist() == [2, 1]


def test_neg_inf_positions_are_never_chosen():
    lp = np.array([[np.log(0.9), -np.inf, 0.0], [-np.inf, 0.0, 0.0], [np.log(0.1)] * 3])
    # Row 0: only position 0 is finite; row 1: nothing; row 2: all finite.
    assert select_draft_lengths(lp, 100).tolist() == [1, 0, 3]
    assert select_draft_lengths(lp, 2).tolist() == [1, 0, 1]
    assert select_draft_lengths(np.full((2, 3), -np.inf), 6).tolist() == [0, 0]


def test_nan_counts_as_neg_inf_and_positive_log_probs_are_clipped():
    lp = np.array([[np.nan, 0.0], [np.log(0.5), 1e-6]])
    assert select_draft_lengths(lp, 4).tolist() == [0, 2]
    # A positive log-prob (round-off) cannot make a later position beat an earlier one.
    lp = np.array([[np.log(0.5), 0.3, 0.3], [np.log(0.6), np.log(0.1), 0.0]])
    for c in range(7):
        assert_is_prefix_selection(lp, select_draft_lengths(lp, c), c)
    # Row 0 scores clip to [log .5] * 3, row 1 to [log .6, log .06, log .06].
    assert select_draft_lengths(lp, 2).tolist() == [1, 1]
    assert select_draft_lengths(lp, 4).tolist() == [3, 1]
    assert select_draft_lengths(np.array([[np.inf, np.inf]]), 2).tolist() == [2]


def test_valid_lengths_bound_the_selection():
    lp = np.zeros((3, 4))
    assert select_draft_lengths(lp, 12, valid_lengths=[4, 0, 2]).tolist() == [4, 0, 2]
    assert select_draft_lengths(lp, 3, valid_lengths=[4, 0, 2]).tolist() == [2, 0, 1]
    with pytest.raises(ValueError):
        select_draft_lengths(lp, 3, valid_lengths=[5, 0, 0])
    with pytest.raises(ValueError):
        select_draft_lengths(lp, 3, valid_lengths=[1, 1])


def test_expected_accepted_values():
    lp = np.log(np.array([[0.5, 0.5], [1.0, 0.1]]))
    assert expected_accepted(lp, [0, 0]) == 0.0
    assert expected_accepted(lp, [2, 0]) == pytest.approx(0.5 + 0.25)
    assert expected_accepted(lp, [2, 2]) == pytest.approx(0.75 + 1.0 + 0.1)
    assert expected_accepted(np.array([[-np.inf, 0.0]]), [2]) == 0.0
    with pytest.raises(ValueError):
        expected_accepted(lp, [3, 0])


# --------------------------------------------------------------------------- plan / config


def test_config_defaults_and_validation():
    cfg = TetrisConfig(k=3)
    assert (cfg.extra, cfg.capacity, cfg.min_batch_size, cfg.enabled) == (1, None, 2, True)
    assert cfg.num_speculative_tokens == 4
    assert cfg.capacity_for(5) == 15
    assert TetrisConfig(k=3, capacity=7).capacity_for(5) == 7
    for bad in ({"k": 0}, {"k": 2, "extra": -1}, {"k": 2, "capacity": -1},
                {"k": 2, "min_batch_size": -1}):
        with pytest.raises(ValueError):
            TetrisConfig(**bad)


def test_plan_default_capacity_is_n_times_k():
    rng = np.random.default_rng(11)
    lp = random_log_probs(rng, 4, 3)
    cfg = TetrisConfig(k=2, extra=1)
    lengths = plan(lp, cfg)
    assert lengths.sum() == 8
    assert lengths.tolist() == select_draft_lengths(lp, 8).tolist()
    assert plan(lp, TetrisConfig(k=2, extra=1, capacity=5)).sum() == 5


def test_plan_fallback_below_min_batch_size_is_window_k():
    lp = np.array([[np.log(0.9), -np.inf, 0.0, 0.0]])
    cfg = TetrisConfig(k=2, extra=2)  # min_batch_size 2: one request -> window k
    assert plan(lp, cfg).tolist() == [2]  # even over a -inf position: plain window k
    assert plan(lp, cfg, valid_lengths=[1]).tolist() == [1]
    lp3 = np.zeros((3, 4))
    cfg3 = TetrisConfig(k=3, extra=1, min_batch_size=4)
    assert plan(lp3, cfg3, valid_lengths=[4, 2, 0]).tolist() == [3, 2, 0]
    # Disabled: window k whatever the batch size.
    assert plan(lp3, TetrisConfig(k=1, extra=3, enabled=False)).tolist() == [1, 1, 1]
    # At min_batch_size TETRIS applies.
    rng = np.random.default_rng(5)
    lp4 = random_log_probs(rng, 4, 4)
    got = plan(lp4, TetrisConfig(k=2, extra=2, min_batch_size=4))
    assert got.tolist() == select_draft_lengths(lp4, 8).tolist()


def test_plan_empty_batch():
    assert plan(np.zeros((0, 3)), TetrisConfig(k=2)).tolist() == []
    assert plan(np.zeros((0, 3)), TetrisConfig(k=2, min_batch_size=0)).tolist() == []
