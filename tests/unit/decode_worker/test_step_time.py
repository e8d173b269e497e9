"""The online step-time model (decode_worker/step_time.py) recovers a known cost structure."""

from __future__ import annotations

import numpy as np
import pytest

from decode_worker.step_time import StepTimeConfig, StepTimeModel, nnls, step_features

# Seconds: overhead, per target token, draft first pass (fixed, per token), further passes
# (fixed, per request-token).
TRUE = np.array([2e-3, 1e-4, 1.5e-3, 2e-5, 1e-3, 1e-5])


def true_time(t, n, k):
    return float(step_features(t, n, k) @ TRUE)


def test_recovers_the_cost_of_each_proposal_length_with_noise_and_outliers():
    rng = np.random.default_rng(0)
    model = StepTimeModel(max_proposal_length=4, config=StepTimeConfig(window=64))
    for step in range(600):
        n = int(rng.integers(1, 64))
        k = int(rng.integers(0, 5))
        t = n + int(rng.integers(0, n * k + 1)) + (int(rng.integers(50, 400)) if step % 17 == 0 else 0)
        seconds = true_time(t, n, k) * rng.normal(1.0, 0.03)
        if step % 50 == 0:
            seconds *= 5  # another process took the cores for a while
        model.observe(t, n, k, seconds)
    assert model.ready
    for t, n, k in [(8, 8, 0), (40, 8, 4), (64, 64, 0), (300, 64, 4), (100, 32, 2)]:
        assert float(model.predict(t, n, k)) == pytest.approx(true_time(t, n, k), rel=0.1)
    assert model.scored > 0 and model.mean_abs_error_s < 0.2 * model.measured_sum / model.scored


def test_not_ready_until_both_regimes_were_seen_and_memory_is_bounded():
    model = StepTimeModel(max_proposal_length=3, config=StepTimeConfig(window=8, min_samples=2))
    for _ in range(50):
        model.observe(10, 10, 3, 0.01)
    assert not model.ready
    model.observe(10, 10, 0, 0.005)
    model.observe(12, 12, 0, 0.006)
    assert model.ready
    assert sum(len(d) for d in model._obs) <= 8 * 4


def test_coefficients_are_never_negative():
    model = StepTimeModel(max_proposal_length=2, config=StepTimeConfig(min_samples=1))
    rng = np.random.default_rng(3)
    for _ in range(100):  # bigger steps are *faster* here: least squares would go negative
        t = int(rng.integers(1, 100))
        model.observe(t, 4, int(rng.integers(0, 3)), 0.02 - 1e-4 * t)
    assert (model.coef >= 0).all()


def test_nnls_matches_the_unconstrained_solution_when_it_is_feasible():
    rng = np.random.default_rng(4)
    a = rng.uniform(size=(30, 4))
    x = np.array([0.5, 1.0, 0.0, 2.0])
    np.testing.assert_allclose(nnls(a, a @ x), x, atol=1e-9)
    b = a @ np.array([1.0, -1.0, 0.5, 0.2])
    got = nnls(a, b)
    assert (got >= 0).all()
    # KKT: gradient non-positive where zero, zero where positive.
    grad = a.T @ (b - a @ got)
    assert (grad[got == 0] <= 1e-9).all() and np.allclose(grad[got > 0], 0, atol=1e-9)


def test_predict_one_is_predict():
    model = StepTimeModel(max_proposal_length=4)
    model.coef = TRUE.copy()
    for t, n, k in [(1, 1, 0), (40, 8, 1), (300, 64, 4)]:
        assert model.predict_one(t, n, k) == pytest.approx(float(model.predict(t, n, k)))


def test_refits_often_while_observations_are_few_then_every_refit_every():
    model = StepTimeModel(max_proposal_length=2, config=StepTimeConfig(window=256, min_samples=2, refit_every=32))
    fits_at = []
    for i in range(200):
        n, k = 1 + i % 7, i % 3
        model.observe(n + k * n, n, k, true_time(n + k * n, n, k))
        if model.version > len(fits_at):
            fits_at.append(i + 1)
    gaps = np.diff(fits_at)
    # A quarter of what has been seen (at least 4) between early refits, refit_every later on.
    assert fits_at[0] <= 6 and all(4 <= g <= 32 for g in gaps) and gaps[0] < 10 and gaps[-1] == 32
