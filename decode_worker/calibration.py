"""Online calibration: draft confidence -> probability that the target accepts the draft token.

TETRIS ranks draft positions, and SmartSpec weighs budgets, by the probability that a draft
token is accepted given that every draft before it was.  The draft model's own probability of
its token (``q(x)``; for greedy drafts the softmax at the argmax) is a poor estimate of that:
a small draft is typically under-confident, and by a different factor at every position.  This
module learns the map from verification outcomes, per

* **kind** of request (greedy: exact match; sampled: vLLM's rejection sampling, accepted with
  ``min(1, p/q)``; coupled: seeded requests, accepted when the draft's and the target's
  Gumbel-max choices agree, see ``seeded_sampling.py``), and whether the request's draft KV
  is **stale** (the draft skipped some of its tokens, see ``spec_scheduler.py``);
* **draft position** (0, 1, ...; positions past ``max_positions - 1`` share the last row);
* **confidence bin** (fixed edges on the raw probability, ``CONFIDENCE_EDGES``).

Each cell keeps exponentially decayed counts of accepted and tried drafts (``decay`` per
observation of that cell: bounded memory, and old behaviour fades), shrunk toward the raw
confidence by ``prior_strength`` pseudo-observations so an empty cell predicts the raw
probability.  The table used for prediction is made monotone in confidence per (key,
position) by pool-adjacent-violators (isotonic regression) and recomputed lazily.

What an outcome is: a request that verified ``n`` drafts of which the target accepted ``a``
tried positions ``0..min(a, n - 1)``; positions ``< a`` were accepted, position ``a`` (when
``a < n``) was rejected, later ones say nothing (they were never tried).

Also kept: the Brier score (mean squared error against the 0/1 outcome) of the raw
confidence and of the calibrated prediction made *before* the outcome was learned.

Pure numpy; no vLLM, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CONFIDENCE_EDGES",
    "KINDS",
    "AcceptanceCalibrator",
    "CalibrationConfig",
    "key_index",
    "pool_adjacent_violators",
]

# Request kinds; a key is (kind, stale).
KINDS = ("greedy", "sampled", "coupled")
NUM_KEYS = 2 * len(KINDS)

# Bin edges on the raw draft probability: finer where small drafts put most of their mass.
CONFIDENCE_EDGES = np.array([0.0, 1e-3, 3e-3, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                             0.6, 0.7, 0.8, 0.9, 1.0])
_MIDPOINTS = np.concatenate(([5e-4], np.sqrt(CONFIDENCE_EDGES[1:-2] * CONFIDENCE_EDGES[2:-1]),
                             [0.95]))
NUM_BINS = len(CONFIDENCE_EDGES) - 1
# Calibrated probabilities stay inside (0, 1): log() stays finite and every draft stays
# rankable (an impossible-looking draft is still cheaper to skip than to trust blindly).
_FLOOR, _CEIL = 1e-4, 1.0 - 1e-4


def key_index(kind: str, stale: bool) -> int:
    return KINDS.index(kind) * 2 + int(bool(stale))


@dataclass(frozen=True)
class CalibrationConfig:
    max_positions: int = 8
    decay: float = 0.999  # per observation of a cell: ~1000 observations of memory
    prior_strength: float = 2.0

    def __post_init__(self) -> None:
        if self.max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {self.max_positions}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {self.decay}")
        if self.prior_strength <= 0:
            raise ValueError(f"prior_strength must be > 0, got {self.prior_strength}")


def pool_adjacent_violators(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in weighted least squares."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks[-1]
            total = w1 + w2
            blocks[-1] = [(v1 * w1 + v2 * w2) / total if total > 0 else (v1 + v2) / 2, total, c1 + c2]
    return np.concatenate([np.full(c, v) for v, _, c in blocks]) if blocks else np.zeros(0)


def _bins(confidence: np.ndarray) -> np.ndarray:
    c = np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=0.0)
    return np.clip(np.searchsorted(CONFIDENCE_EDGES, c, side="right") - 1, 0, NUM_BINS - 1)


class AcceptanceCalibrator:
    """The online map; ``predict`` and ``update`` take whole batches (one call per step)."""

    def __init__(self, config: CalibrationConfig | None = None):
        self.config = config or CalibrationConfig()
        shape = (NUM_KEYS, self.config.max_positions, NUM_BINS)
        self.accepted = np.zeros(shape)
        self.tried = np.zeros(shape)
        self._table: np.ndarray | None = None
        self._dirty: set[tuple[int, int]] = set()  # (key, position) rows to re-fit
        self.observations = 0
        self.brier_raw_sum = 0.0
        self.brier_calibrated_sum = 0.0

    # ----- prediction

    def table(self) -> np.ndarray:
        """``[keys, positions, bins]`` calibrated acceptance probabilities (monotone in bins)."""
        if self._table is None:
            self._table = np.empty_like(self.tried)
            self._dirty = {(k, p) for k in range(self.tried.shape[0]) for p in range(self.tried.shape[1])}
        prior = self.config.prior_strength
        for k, p in self._dirty:
            weights = self.tried[k, p] + prior
            raw = (self.accepted[k, p] + prior * _MIDPOINTS) / weights
            self._table[k, p] = np.clip(pool_adjacent_violators(raw, weights), _FLOOR, _CEIL)
        self._dirty = set()
        return self._table

    def predict(self, keys, confidence) -> np.ndarray:
        """``[n, m]`` acceptance probabilities for draft confidences ``[n, m]`` of requests with
        calibration keys ``[n]`` (``key_index``).  NaN confidence (no draft) gives NaN."""
        conf = np.asarray(confidence, dtype=np.float64)
        if conf.ndim != 2:
            raise ValueError(f"confidence must be 2-D [requests, positions], got {conf.shape}")
        n, m = conf.shape
        keys = np.asarray(keys, dtype=np.int64).reshape(n, 1)
        pos = np.minimum(np.arange(m), self.config.max_positions - 1)[None, :]
        out = self.table()[keys, pos, _bins(conf)]
        return np.where(np.isnan(conf), np.nan, out)

    # ----- learning

    def update(self, keys, confidence, verified, accepted) -> int:
        """Learn from one step's verifications: request ``i`` (key ``keys[i]``, draft confidences
        ``confidence[i]``) verified ``verified[i]`` drafts and had ``accepted[i]`` accepted.
        Returns the number of outcomes learned."""
        conf = np.asarray(confidence, dtype=np.float64)
        if conf.ndim != 2:
            raise ValueError(f"confidence must be 2-D [requests, positions], got {conf.shape}")
        n, m = conf.shape
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        verified = np.minimum(np.asarray(verified, dtype=np.int64).reshape(-1), m)
        accepted = np.asarray(accepted, dtype=np.int64).reshape(-1)
        if not (keys.shape[0] == verified.shape[0] == accepted.shape[0] == n):
            raise ValueError("keys, verified and accepted need one entry per request")
        if (accepted < 0).any() or (accepted > verified).any():
            raise ValueError(f"accepted must lie in 0..verified, got {accepted.tolist()} of {verified.tolist()}")
        pos = np.arange(m)[None, :]
        tried = (pos <= accepted[:, None]) & (pos < verified[:, None]) & ~np.isnan(conf)
        if not tried.any():
            return 0
        outcome = (pos < accepted[:, None]).astype(np.float64)
        rows, cols = np.nonzero(tried)
        y = outcome[rows, cols]
        raw = np.clip(conf[rows, cols], 0.0, 1.0)
        before = self.predict(keys, conf)[rows, cols]
        self.brier_raw_sum += float(((raw - y) ** 2).sum())
        self.brier_calibrated_sum += float(((before - y) ** 2).sum())
        self.observations += int(y.size)
        k = keys[rows]
        p = np.minimum(cols, self.config.max_positions - 1)
        b = _bins(raw)
        # Cell by cell, in order: each observation decays its cell once (np.add.at would merge
        # repeats of a cell into one decay).
        d = self.config.decay
        for kk, pp, bb, yy in zip(k.tolist(), p.tolist(), b.tolist(), y.tolist(), strict=True):
            self.accepted[kk, pp, bb] = self.accepted[kk, pp, bb] * d + yy
            self.tried[kk, pp, bb] = self.tried[kk, pp, bb] * d + 1.0
            self._dirty.add((kk, pp))
        return int(y.size)

    # ----- reporting

    @property
    def brier_raw(self) -> float:
        return self.brier_raw_sum / self.observations if self.observations else 0.0

    @property
    def brier_calibrated(self) -> float:
        return self.brier_calibrated_sum / self.observations if self.observations else 0.0
