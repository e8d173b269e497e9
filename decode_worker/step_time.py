"""An online model of one engine step's wall time, fitted to the engine's own measured steps.

SmartSpec (``smartspec.py``) needs the time of a step as a function of what it verifies and
what it drafts.  One step of a speculating vLLM engine runs the target over ``T`` tokens (one
per decoding request, plus the drafts it verifies, plus any prompt tokens), then the draft
model: a first pass over the same ``T`` tokens (it writes the draft's KV for them and
proposes the first draft token), then ``K - 1`` more passes over the ``N`` decoding requests,
one token each.  With ``K = 0`` the draft does not run at all (``spec_runner.py`` skips it).
So the model is linear in

    [1, T, [K > 0], [K > 0] * T, max(K - 1, 0), N * max(K - 1, 0)]

with non-negative coefficients: fixed step overhead, target cost per token, the draft's
fixed and per-token cost for its first pass, and the fixed and per-token cost of each further
draft pass.

Fitting: weighted least squares with non-negative coefficients (Lawson-Hanson), a small ridge
on column-normalised features, and one Huber re-weighting pass (the machine is shared: a few
steps are slow for reasons that have nothing to do with their size).  Memory is bounded: the
last ``window`` observations *per proposal length* ``K`` are kept, so the lengths the policy
rarely picks (exploration) are still represented when it mostly picks one.

Pure numpy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["StepTimeConfig", "StepTimeModel", "nnls", "step_features"]

NUM_FEATURES = 6


def step_features(target_tokens, num_requests, proposal_length) -> np.ndarray:
    """``[..., 6]`` features of steps (arguments broadcast together)."""
    t = np.asarray(target_tokens, dtype=np.float64)
    n = np.asarray(num_requests, dtype=np.float64)
    k = np.asarray(proposal_length, dtype=np.float64)
    t, n, k = np.broadcast_arrays(t, n, k)
    drafts = (k > 0).astype(np.float64)
    extra = np.maximum(k - 1.0, 0.0)
    return np.stack([np.ones_like(t), t, drafts, drafts * t, extra, n * extra], axis=-1)


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """``argmin ||a x - b||`` over ``x >= 0`` (Lawson-Hanson active set)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        w = a.T @ (b - a @ x)
        candidates = ~passive & (w > 1e-12)
        if not candidates.any():
            break
        passive[np.argmax(np.where(candidates, w, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            bad = passive & (z <= 0)
            alpha = np.min(x[bad] / np.maximum(x[bad] - z[bad], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
            x[~passive] = 0.0
    return x


@dataclass(frozen=True)
class StepTimeConfig:
    window: int = 64  # observations kept per proposal length
    min_samples: int = 4  # per regime (K = 0 and K > 0) before predictions are trusted
    refit_every: int = 32  # observations between refits (sooner while there are few: see observe)
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        if self.window < 2 or self.min_samples < 1 or self.refit_every < 1 or self.ridge < 0:
            raise ValueError(f"bad StepTimeConfig {self}")


class StepTimeModel:
    """Observations in, predicted seconds out; see the module docstring."""

    def __init__(self, max_proposal_length: int, config: StepTimeConfig | None = None):
        self.config = config or StepTimeConfig()
        self.max_proposal_length = max_proposal_length
        self._obs: list[deque] = [deque(maxlen=self.config.window) for _ in range(max_proposal_length + 1)]
        self.coef = np.zeros(NUM_FEATURES)
        self._since_fit = 0
        self._fitted = False
        self.version = 0  # bumps at every refit (callers cache predictions per version)
        # Prediction error, over the observations made once the model was ready.
        self.scored = 0
        self.predicted_sum = 0.0
        self.measured_sum = 0.0
        self.abs_error_sum = 0.0

    @property
    def ready(self) -> bool:
        c = self.config.min_samples
        return len(self._obs[0]) >= c and sum(len(d) for d in self._obs[1:]) >= c

    def observe(self, target_tokens: int, num_requests: int, proposal_length: int, seconds: float) -> None:
        k = min(max(int(proposal_length), 0), self.max_proposal_length)
        if self._fitted and self.ready:
            predicted = self.predict_one(target_tokens, num_requests, k)
            self.scored += 1
            self.predicted_sum += predicted
            self.measured_sum += seconds
            self.abs_error_sum += abs(predicted - seconds)
        self._obs[k].append((float(target_tokens), float(num_requests), float(k), float(seconds)))
        self._since_fit += 1
        # Early on every few observations change the fit a lot (and the policy acts on it every
        # step): refit after a quarter as many new ones as there are, up to refit_every.
        total = sum(len(d) for d in self._obs)
        due = min(self.config.refit_every, max(4, total // 4))
        if self.ready and (not self._fitted or self._since_fit >= due):
            self.fit()

    def fit(self) -> None:
        rows = [o for d in self._obs for o in d]
        if not rows:
            return
        data = np.array(rows)
        a = step_features(data[:, 0], data[:, 1], data[:, 2])
        y = data[:, 3]
        scale = np.sqrt((a ** 2).mean(axis=0))
        scale[scale == 0] = 1.0
        an = a / scale
        weights = np.ones(len(y))
        coef = np.zeros(NUM_FEATURES)
        for _ in range(2):  # least squares, then one Huber re-weighting
            sw = np.sqrt(weights)[:, None]
            lhs = np.vstack([an * sw, np.sqrt(self.config.ridge * len(y)) * np.eye(NUM_FEATURES)])
            rhs = np.concatenate([y * sw[:, 0], np.zeros(NUM_FEATURES)])
            coef = nnls(lhs, rhs)
            resid = np.abs(an @ coef - y)
            cut = 1.345 * max(np.median(resid) / 0.6745, 1e-6)
            weights = np.minimum(1.0, cut / np.maximum(resid, 1e-12))
        self.coef = coef / scale
        self._fitted = True
        self._since_fit = 0
        self.version += 1

    def predict_one(self, target_tokens: float, num_requests: float, proposal_length: int) -> float:
        """``predict`` for one step, without numpy's per-call overhead (called every step)."""
        c = self.coef.tolist()
        drafts = 1.0 if proposal_length > 0 else 0.0
        extra = max(proposal_length - 1.0, 0.0)
        return (c[0] + c[1] * target_tokens + drafts * (c[2] + c[3] * target_tokens)
                + extra * (c[4] + c[5] * num_requests))

    def predict(self, target_tokens, num_requests, proposal_length) -> np.ndarray:
        """Predicted seconds (broadcast over the arguments); zeros before the first fit."""
        return step_features(target_tokens, num_requests, proposal_length) @ self.coef

    @property
    def mean_abs_error_s(self) -> float:
        return self.abs_error_sum / self.scored if self.scored else 0.0
