"""SmartSpec: how much to speculate each step, chosen by predicted goodput.

Speculation pays only while the tokens it adds outweigh the time it costs: under load, or with
a draft that is rarely right, or on hardware where the target's step is cheap compared with
the draft's, it slows decoding down.  So every step the policy picks

* the **proposal length** ``K`` in ``0..k + e`` (decided when the step is scheduled, before
  the draft runs; ``K = 0`` means the draft does not run at all), and
* the **budget** ``B`` in ``0..N * K`` (decided when the drafts are handed to the scheduler,
  with this step's calibrated acceptance probabilities): how many of the proposed draft
  tokens the next step verifies; TETRIS (``tetris.py``) picks which ones, or with TETRIS off
  every request verifies the same number (SmartSpec's uniform length)

to maximise the estimated goodput

    goodput(B) = (N + E[accepted | B]) / predicted_step_time(T = N + B, N, K)

(each of the ``N`` requests yields one token per step whatever happens, plus its accepted
drafts).  ``E[accepted | B]`` is the sum of the ``B`` best prefix probabilities (products of
calibrated per-token acceptance probabilities, ``calibration.py``); the step time comes from
``step_time.py``, fitted online to the engine's own steps.  Speculation happens only when
its best goodput beats no speculation (``B = 0``) by ``min_gain``; a proposal length
``K > 0`` must win by ``min_gain_draft``, a wider margin, because it pays for the draft passes
before the drafts are seen, and because the step-time model extrapolates least reliably there
(a model fitted at one batch size can put the draft's cost in its per-pass or its per-token
term, which only other batch sizes tell apart).

For ``K`` the same formula is evaluated per candidate length with the expected acceptance of
the step's requests (each one's calibrated probabilities from its last proposal, extended by
the running mean per position) under the steady-state assumption that the next step drafts
``K`` again.

Exploration: a policy that never speculates never learns that it should.  Before the step
time model has seen both regimes (``K = 0`` and ``K > 0``) the policy cycles ``K`` through
every length (warm-up).  Afterwards, while it keeps choosing ``K = 0``, every
``explore_interval`` steps it speculates once with its best positive choice (``K >= 1``,
``B >= 1``); the interval doubles every time (up to ``explore_max_interval``) and falls back
to ``explore_min_interval`` when speculation wins on its own.  Everything is deterministic (no
random numbers): the same sequence of steps gives the same decisions.

Pure numpy; no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from decode_worker.calibration import NUM_KEYS, AcceptanceCalibrator, CalibrationConfig
from decode_worker.step_time import StepTimeConfig, StepTimeModel
from decode_worker.tetris import rank_positions

__all__ = [
    "BudgetChoice",
    "BudgetPolicy",
    "SmartSpecConfig",
    "best_goodput",
    "gain_curve",
]

# Assumed per-token acceptance probability where nothing has been learned yet.
_UNKNOWN_RATE = 0.3


@dataclass(frozen=True)
class SmartSpecConfig:
    min_gain: float = 0.02  # verify drafts only when predicted goodput beats none by this fraction
    min_gain_draft: float = 0.10  # run the draft (K > 0) only when it is predicted to win by this
    explore_min_interval: int = 16
    explore_max_interval: int = 1024
    rate_decay: float = 0.98  # running mean of calibrated acceptance per (key, position)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    step_time: StepTimeConfig = field(default_factory=StepTimeConfig)

    def __post_init__(self) -> None:
        if self.min_gain < 0 or self.min_gain_draft < 0:
            raise ValueError(f"min_gain and min_gain_draft must be >= 0, got {self.min_gain}, {self.min_gain_draft}")
        if not 1 <= self.explore_min_interval <= self.explore_max_interval:
            raise ValueError("need 1 <= explore_min_interval <= explore_max_interval")
        if not 0.0 <= self.rate_decay < 1.0:
            raise ValueError(f"rate_decay must lie in [0, 1), got {self.rate_decay}")


def gain_curve(log_probs, valid_lengths=None, *, uniform: bool = False):
    """Budgets and their expected accepted drafts, best allocation first.

    Returns ``(budgets, expected, lengths_of)``: ``budgets[c]`` draft tokens verified and
    ``expected[c]`` expected accepted for choice ``c`` (``c = 0`` is no speculation), and
    ``lengths_of(c)`` the per-request lengths.  TETRIS: choice ``c`` is the ``c`` best
    positions (``budgets[c] = c``).  ``uniform``: choice ``c`` gives every request
    ``min(c, valid)`` drafts.
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    n, m = lp.shape
    valid = np.full(n, m, dtype=np.int64) if valid_lengths is None else np.asarray(valid_lengths, np.int64)
    if not uniform:
        rows, _, scores = rank_positions(lp, valid_lengths=valid)
        expected = np.concatenate(([0.0], np.cumsum(np.exp(scores))))
        budgets = np.arange(len(expected), dtype=np.int64)

        def lengths_of(c: int) -> np.ndarray:
            return np.bincount(rows[:c], minlength=n).astype(np.int64)

        return budgets, expected, lengths_of
    prefix = np.exp(np.cumsum(np.minimum(np.nan_to_num(lp, nan=-np.inf), 0.0), axis=1))
    prefix = np.where(np.arange(m)[None, :] < valid[:, None], prefix, 0.0)
    expected = np.concatenate(([0.0], np.cumsum(prefix.sum(axis=0))))
    budgets = np.array([int(np.minimum(valid, c).sum()) for c in range(m + 1)], dtype=np.int64)

    def lengths_of(c: int) -> np.ndarray:
        return np.minimum(valid, c).astype(np.int64)

    return budgets, expected, lengths_of


def best_goodput(budgets, expected, num_requests: int, step_seconds, *, min_gain: float = 0.0,
                 force_positive: bool = False) -> tuple[int, np.ndarray]:
    """Index of the best choice and the goodput of every choice.

    ``step_seconds[c]`` is the predicted time of the step verifying ``budgets[c]`` drafts.
    Choice 0 (no speculation) wins unless another beats it by ``min_gain``; with
    ``force_positive`` the best choice with a positive budget wins (exploration).
    """
    seconds = np.asarray(step_seconds, dtype=np.float64)
    goodput = (num_requests + np.asarray(expected, dtype=np.float64)) / np.maximum(seconds, 1e-9)
    positive = np.asarray(budgets) > 0
    if force_positive and positive.any():
        return int(np.flatnonzero(positive)[np.argmax(goodput[positive])]), goodput
    best = int(np.argmax(goodput))
    if best != 0 and goodput[best] < goodput[0] * (1.0 + min_gain):
        best = 0
    return best, goodput


@dataclass
class BudgetChoice:
    lengths: np.ndarray  # per request
    budget: int
    expected_accepted: float
    reason: str  # "goodput" | "explore" | "warmup" | "no-gain"
    goodput_gain: float = 0.0  # predicted goodput / no-speculation goodput


class BudgetPolicy:
    """The per-engine SmartSpec state: calibration, step-time model, exploration."""

    def __init__(self, k: int, extra: int, *, uniform: bool = False, capacity: int | None = None,
                 config: SmartSpecConfig | None = None):
        self.config = config or SmartSpecConfig()
        self.k, self.k_max = k, k + extra
        self.uniform = uniform
        self.capacity = capacity
        self.calibrator = AcceptanceCalibrator(self.config.calibration)
        self.step_model = StepTimeModel(self.k_max, self.config.step_time)
        self.rates = np.full((NUM_KEYS, self.k_max), np.nan)  # running mean acceptance
        self.last_rows: dict[str, np.ndarray] = {}  # req_id -> calibrated probs of its last drafts
        self._warmup = [self.k_max, 0, *range(1, self.k_max)]
        self._warmup_index = 0
        self._skip_streak = 0
        self.explore_interval = self.config.explore_min_interval
        self.exploring = False
        self.explorations = 0
        self._k_cache: tuple | None = None
        self._rates_version = 0

    # ----- proposal length (at schedule time)

    def expected_rows(self, requests: list[tuple[str, int]]) -> np.ndarray:
        """``[n, k_max]`` expected per-token acceptance of the requests ``(req_id, key)``."""
        rows = np.empty((len(requests), self.k_max))
        known = ~np.isnan(self.rates)
        counts = known.sum(axis=0)
        fallback = np.where(counts > 0, np.where(known, self.rates, 0.0).sum(axis=0) / np.maximum(counts, 1),
                            _UNKNOWN_RATE)
        for i, (req_id, key) in enumerate(requests):
            rate = np.where(np.isnan(self.rates[key]), fallback, self.rates[key])
            last = self.last_rows.get(req_id)
            if last is not None and len(last):
                rate = rate.copy()
                rate[:len(last)] = last[: self.k_max]
            rows[i] = rate
        return rows

    def proposal_length(self, requests: list[tuple[str, int]]) -> tuple[int, str]:
        """``K`` for the drafts proposed at the end of this step, for the requests
        ``(req_id, calibration key)`` that will be decoding then."""
        n = len(requests)
        if n == 0:
            return 0, "idle"
        if not self.step_model.ready:
            k = self._warmup[self._warmup_index % len(self._warmup)]
            self._warmup_index += 1
            return k, "warmup"
        cache_key = (tuple(sorted(requests)), self.step_model.version, self._rates_version)
        if self._k_cache is not None and self._k_cache[0] == cache_key:
            k, goodputs = self._k_cache[1], self._k_cache[2]
        else:
            log_rows = np.log(np.clip(self.expected_rows(requests), 1e-9, 1.0))
            goodputs = np.zeros(self.k_max + 1)
            for cand in range(self.k_max + 1):
                budgets, expected, _ = gain_curve(log_rows[:, :cand], uniform=self.uniform)
                budgets, expected = self._capped(budgets, expected)
                seconds = self.step_model.predict(n + budgets, n, cand)
                _, g = best_goodput(budgets, expected, n, seconds)
                goodputs[cand] = g.max()
            k = int(np.argmax(goodputs))
            if k and goodputs[k] < goodputs[0] * (1.0 + self.config.min_gain_draft):
                k = 0
            self._k_cache = (cache_key, k, goodputs)
        if k > 0:
            self._skip_streak = 0
            self.explore_interval = self.config.explore_min_interval
            return k, "goodput"
        self._skip_streak += 1
        if self._skip_streak >= self.explore_interval:
            self._skip_streak = 0
            self.explore_interval = min(2 * self.explore_interval, self.config.explore_max_interval)
            self.exploring = True
            self.explorations += 1
            return int(np.argmax(goodputs[1:])) + 1, "explore"
        return 0, "no-gain"

    # ----- budget (when the drafts are handed over)

    def _capped(self, budgets, expected):
        if self.capacity is None:
            return budgets, expected
        keep = budgets <= self.capacity
        return budgets[keep], expected[keep]

    def choose(self, calibrated_log_probs, valid_lengths, next_proposal_length: int,
               *, warmup: bool = False) -> BudgetChoice:
        """Lengths for one step's drafts: ``calibrated_log_probs`` ``[n, K]`` (log of the
        calibrated per-token acceptance probability, ``-inf``/NaN where there is no draft)."""
        lp = np.asarray(calibrated_log_probs, dtype=np.float64)
        n = lp.shape[0]
        budgets, expected, lengths_of = gain_curve(lp, valid_lengths, uniform=self.uniform)
        budgets, expected = self._capped(budgets, expected)
        exploring, self.exploring = self.exploring, False
        if warmup or not self.step_model.ready:
            cap = self.k * n if self.capacity is None else self.capacity
            c = int(np.flatnonzero(budgets <= cap)[-1]) if self.uniform else min(cap, len(budgets) - 1)
            return BudgetChoice(lengths_of(c), int(budgets[c]), float(expected[c]), "warmup")
        seconds = self.step_model.predict(n + budgets, n, next_proposal_length)
        c, goodput = best_goodput(budgets, expected, n, seconds, min_gain=self.config.min_gain,
                                  force_positive=exploring)
        reason = "explore" if exploring else ("goodput" if c else "no-gain")
        gain = float(goodput[c] / goodput[0]) if goodput[0] > 0 else 0.0
        return BudgetChoice(lengths_of(c), int(budgets[c]), float(expected[c]), reason, gain)

    # ----- learning

    def remember(self, req_ids: list[str], keys, calibrated_probs) -> None:
        """This step's calibrated per-token probabilities of each request's drafts."""
        probs = np.asarray(calibrated_probs, dtype=np.float64)
        keys = np.asarray(keys, dtype=np.int64)
        d = self.config.rate_decay
        width = min(probs.shape[1], self.k_max) if probs.ndim == 2 else 0
        for key in np.unique(keys).tolist():
            block = probs[keys == key, :width]
            seen = ~np.isnan(block)
            for j in np.flatnonzero(seen.any(axis=0)).tolist():
                v = float(block[seen[:, j], j].mean())
                old = self.rates[key, j]
                self.rates[key, j] = v if np.isnan(old) else d * old + (1 - d) * v
        self._rates_version += 1
        for req_id, row in zip(req_ids, probs, strict=True):
            row = row[~np.isnan(row)]
            self.last_rows[req_id] = row

    def forget(self, live_req_ids) -> None:
        """Drop what is kept about requests no longer running (bounded memory)."""
        live = set(live_req_ids)
        for req_id in [r for r in self.last_rows if r not in live]:
            del self.last_rows[req_id]
