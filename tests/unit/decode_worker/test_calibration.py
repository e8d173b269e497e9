"""Online calibration (decode_worker/calibration.py) converges on synthetic verification outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from decode_worker.calibration import (
    CONFIDENCE_EDGES,
    AcceptanceCalibrator,
    CalibrationConfig,
    key_index,
    pool_adjacent_violators,
)


def true_rate(conf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """An under-confident draft: acceptance ~ 3x its probability, lower at later positions."""
    return np.minimum(0.95, 0.1 + 2.5 * conf) * 0.9 ** pos


def simulate(cal: AcceptanceCalibrator, rng, steps: int, key: int, width: int = 5, batch: int = 16) -> None:
    for _ in range(steps):
        conf = rng.beta(1.2, 4.0, size=(batch, width))
        accept = rng.uniform(size=(batch, width)) < true_rate(conf, np.arange(width)[None, :])
        # Sequential acceptance: the first rejection ends the request's run.
        accepted = np.where(accept.all(axis=1), width, np.argmin(accept, axis=1))
        verified = rng.integers(1, width + 1, size=batch)
        cal.update(np.full(batch, key), conf, verified, np.minimum(accepted, verified))


def test_converges_to_the_true_acceptance_rate_and_beats_raw_confidence():
    rng = np.random.default_rng(0)
    cal = AcceptanceCalibrator(CalibrationConfig(decay=0.9995))
    key = key_index("sampled", False)
    simulate(cal, rng, 1500, key)
    conf = np.array([[0.02, 0.05, 0.12, 0.25, 0.35]])
    for pos in range(3):
        # Position is the column index: predict a row whose column `pos` has this confidence.
        row = np.full((1, pos + 1), 0.5)
        row[0, pos] = conf[0, pos]
        got = cal.predict([key], row)[0, pos]
        assert got == pytest.approx(true_rate(conf[0, pos], pos), abs=0.06), (pos, got)
    assert cal.observations > 10_000
    # The raw draft probability is a poor estimate; the calibrated one is much better.
    assert cal.brier_calibrated < 0.8 * cal.brier_raw


def test_table_is_monotone_in_confidence_and_bounded():
    rng = np.random.default_rng(1)
    cal = AcceptanceCalibrator()
    simulate(cal, rng, 200, key_index("greedy", True))
    table = cal.table()
    assert (np.diff(table, axis=-1) >= -1e-12).all()
    assert ((table > 0) & (table < 1)).all()
    # Bounded memory: the tables have a fixed shape whatever the number of updates.
    assert cal.tried.shape == (6, cal.config.max_positions, len(CONFIDENCE_EDGES) - 1)


def test_empty_cells_predict_about_the_raw_confidence_and_keys_are_separate():
    cal = AcceptanceCalibrator()
    conf = np.array([[0.05, 0.5, 0.95]])
    before = cal.predict([0], conf)
    assert np.all(np.abs(before - conf) < 0.1)
    rng = np.random.default_rng(2)
    simulate(cal, rng, 300, key_index("coupled", False))
    # Learning one key leaves the others at their prior.
    np.testing.assert_allclose(cal.predict([key_index("greedy", False)], conf), before)


def test_only_tried_positions_are_learned():
    cal = AcceptanceCalibrator(CalibrationConfig(prior_strength=1.0))
    # 4 verified, 1 accepted: position 0 accepted, position 1 rejected, 2 and 3 never tried.
    learned = cal.update([0], [[0.5, 0.5, 0.5, 0.5]], [4], [1])
    assert learned == 2
    assert cal.tried[0, :, :].sum() == pytest.approx(2.0)
    assert cal.accepted[0, 0].sum() == pytest.approx(1.0) and cal.accepted[0, 1].sum() == 0.0
    with pytest.raises(ValueError):
        cal.update([0], [[0.5, 0.5]], [1], [2])


def test_nan_confidence_predicts_nan():
    cal = AcceptanceCalibrator()
    got = cal.predict([0, 1], [[0.3, np.nan], [np.nan, np.nan]])
    assert np.isnan(got[0, 1]) and np.isnan(got[1]).all() and not np.isnan(got[0, 0])


@pytest.mark.parametrize("seed", range(20))
def test_pool_adjacent_violators_is_the_monotone_least_squares_fit(seed):
    rng = np.random.default_rng(seed)
    v, w = rng.uniform(size=8), rng.uniform(0.1, 2.0, size=8)
    fit = pool_adjacent_violators(v, w)
    assert (np.diff(fit) >= -1e-12).all()
    # No monotone perturbation improves the weighted error (checked against random monotone fits).
    best = float((w * (fit - v) ** 2).sum())
    for _ in range(200):
        other = np.sort(rng.uniform(size=8))
        assert float((w * (other - v) ** 2).sum()) >= best - 1e-12
