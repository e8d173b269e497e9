"""SmartSpec's budget chooser (decode_worker/smartspec.py): pure decisions on synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest

from decode_worker.calibration import key_index
from decode_worker.smartspec import BudgetPolicy, SmartSpecConfig, best_goodput, gain_curve
from decode_worker.step_time import step_features
from decode_worker.tetris import expected_accepted, select_draft_lengths

GREEDY = key_index("greedy", False)


@pytest.mark.parametrize("seed", range(10))
def test_gain_curve_is_tetris_for_every_budget(seed):
    rng = np.random.default_rng(seed)
    lp = np.log(rng.uniform(0.05, 1.0, size=(5, 4)))
    valid = rng.integers(0, 5, size=5)
    budgets, expected, lengths_of = gain_curve(lp, valid)
    assert list(budgets) == list(range(int(valid.sum()) + 1))
    for c in budgets:
        want = select_draft_lengths(lp, int(c), valid_lengths=valid)
        np.testing.assert_array_equal(lengths_of(int(c)), want)
        assert expected[c] == pytest.approx(expected_accepted(lp, want))


def test_uniform_gain_curve_gives_every_request_the_same_length():
    lp = np.log(np.array([[0.9, 0.5, 0.1], [0.2, 0.9, 0.9]]))
    budgets, expected, lengths_of = gain_curve(lp, [3, 1], uniform=True)
    assert list(budgets) == [0, 2, 3, 4]
    np.testing.assert_array_equal(lengths_of(2), [2, 1])
    assert expected[1] == pytest.approx(0.9 + 0.2)
    assert expected[3] == pytest.approx(expected_accepted(lp, [3, 1]))


def test_chooser_picks_zero_when_no_budget_beats_no_speculation():
    budgets = np.arange(9)
    expected = 0.3 * (1 - 0.5 ** budgets) / 0.5  # diminishing, at most 0.6 accepted
    n = 4
    # Each verified draft costs 20% of a whole no-speculation step: never worth it.
    seconds = 1.0 + 0.2 * budgets
    best, goodput = best_goodput(budgets, expected, n, seconds)
    assert best == 0 and goodput.argmax() == 0
    # Cheap verification: the best positive budget wins, and it is the argmax.
    seconds = 1.0 + 0.01 * budgets
    best, goodput = best_goodput(budgets, expected, n, seconds)
    assert best > 0 and best == goodput.argmax()
    # A gain below min_gain is not worth the risk.
    best, _ = best_goodput(budgets, expected, n, seconds, min_gain=0.5)
    assert best == 0
    # Exploration: the best *positive* budget even when it loses.
    best, goodput = best_goodput(budgets, expected, n, 1.0 + 0.2 * budgets, force_positive=True)
    assert best > 0 and best == 1 + int(goodput[1:].argmax())


def train(policy: BudgetPolicy, coef, rng, steps: int = 400) -> None:
    for _ in range(steps):
        n = int(rng.integers(1, 32))
        k = int(rng.integers(0, policy.k_max + 1))
        t = n + int(rng.integers(0, n * k + 1))
        policy.step_model.observe(t, n, k, float(step_features(t, n, k) @ coef))


def test_policy_never_speculates_where_drafting_costs_more_than_it_can_win_and_explores_rarely():
    rng = np.random.default_rng(0)
    policy = BudgetPolicy(3, 1, config=SmartSpecConfig(explore_min_interval=4, explore_max_interval=32))
    # A draft pass costs as much as a target step (the CPU demo pair's regime).
    train(policy, np.array([1e-3, 5e-5, 1e-3, 5e-5, 1e-3, 5e-5]), rng)
    requests = [(f"r{i}", GREEDY) for i in range(8)]
    policy.remember([r for r, _ in requests], [GREEDY] * 8, np.full((8, 4), 0.5))
    decisions = [policy.proposal_length(requests) for _ in range(200)]
    explore_steps = [i for i, (_, why) in enumerate(decisions) if why == "explore"]
    assert all(k == 0 for k, why in decisions if why != "explore")
    assert all(k > 0 for k, why in decisions if why == "explore")
    # Every interval-th step explores; the interval doubles: 4, 8, 16, then 32 at most.
    gaps = np.diff([-1, *explore_steps])
    assert list(gaps[:5]) == [4, 8, 16, 32, 32] and len(explore_steps) <= 9
    # Poor drafts are not worth verifying, except right after an exploration decision.
    lp = np.log(np.full((8, 4), 0.01))
    policy.exploring = False
    assert policy.choose(lp, None, 4).budget == 0
    policy.exploring = True
    choice = policy.choose(lp, None, 4)
    assert choice.budget > 0 and choice.reason == "explore"


def test_policy_speculates_where_the_target_is_expensive_and_drafts_are_good():
    rng = np.random.default_rng(1)
    policy = BudgetPolicy(3, 2)
    # Target step: 20 ms fixed + 0.1 ms per token; a draft pass 1 ms.
    train(policy, np.array([20e-3, 1e-4, 1e-3, 1e-5, 1e-3, 1e-5]), rng)
    requests = [(f"r{i}", GREEDY) for i in range(8)]
    policy.remember([r for r, _ in requests], [GREEDY] * 8, np.full((8, 5), 0.8))
    k, why = policy.proposal_length(requests)
    assert why == "goodput" and k >= 3
    choice = policy.choose(np.log(np.full((8, 5), 0.8)), None, k)
    assert choice.reason == "goodput" and choice.budget >= 8 * 3 and choice.goodput_gain > 1.5
    # With poor drafts the same hardware verifies less.
    poor = policy.choose(np.log(np.full((8, 5), 0.05)), None, k)
    assert poor.budget < choice.budget


def test_warmup_cycles_through_every_proposal_length_then_stops():
    policy = BudgetPolicy(2, 1)
    requests = [("a", GREEDY)]
    seen = []
    for _ in range(12):
        k, why = policy.proposal_length(requests)
        assert why == "warmup"
        seen.append(k)
    assert set(seen) == {0, 1, 2, 3}
    rng = np.random.default_rng(2)
    train(policy, np.array([1e-3, 1e-4, 1e-3, 1e-5, 1e-3, 1e-5]), rng, steps=50)
    assert policy.proposal_length(requests)[1] != "warmup"


def test_capacity_caps_the_goodput_budget_and_memory_is_bounded():
    rng = np.random.default_rng(3)
    policy = BudgetPolicy(3, 2, capacity=5)
    train(policy, np.array([20e-3, 1e-4, 1e-3, 1e-5, 1e-3, 1e-5]), rng)
    choice = policy.choose(np.log(np.full((8, 5), 0.9)), None, 5)
    assert 0 < choice.budget <= 5 and choice.lengths.sum() == choice.budget
    policy.remember([f"r{i}" for i in range(100)], [GREEDY] * 100, np.full((100, 5), 0.5))
    policy.forget({"r1", "r2"})
    assert set(policy.last_rows) == {"r1", "r2"}


def test_running_the_draft_needs_a_wider_margin_than_verifying_drafts_already_made():
    # A draft pass costs 11 ms on top of a 10 ms step; verifying a draft token 0.1 ms.
    coef = np.array([10e-3, 1e-4, 11e-3, 1e-5, 2e-3, 1e-5])
    requests = [(f"r{i}", GREEDY) for i in range(4)]
    rows = np.full((4, 5), 0.72)

    def policy(min_gain_draft: float) -> BudgetPolicy:
        p = BudgetPolicy(3, 2, config=SmartSpecConfig(min_gain_draft=min_gain_draft))
        train(p, coef, np.random.default_rng(4))
        p.remember([r for r, _ in requests], [GREEDY] * 4, rows)
        return p

    n, model = len(requests), policy(0.0).step_model
    no_spec = n / model.predict_one(n, n, 0)
    best_gain = max((n + n * float(np.cumprod(rows[0, :k]).sum())) / model.predict_one(n + n * k, n, k) / no_spec
                    for k in range(1, 6))
    assert 1.0 < best_gain < 1.10  # drafting is predicted to win, but by less than the default 10%
    assert policy(0.0).proposal_length(requests)[0] > 0
    assert policy(0.10).proposal_length(requests) == (0, "no-gain")
    # Drafts that exist anyway (the draft already ran) are still verified: only min_gain applies.
    choice = policy(0.10).choose(np.log(rows), None, 3)
    assert choice.budget > 0 and choice.reason == "goodput"
