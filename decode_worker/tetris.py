"""TETRIS: batch-level choice of how many draft tokens each request sends to verification.

Per decode step the draft model proposes ``K = k + e`` tokens for each of ``N`` running
requests, and the target model may verify at most ``C`` of them in total (the capacity;
by default ``C = N * k``, what standard speculative decoding with window ``k`` verifies).

Under the usual model, draft token ``j`` of request ``i`` is accepted iff every draft
token before it was accepted, and each is accepted with (an estimate of) its draft
probability.  The probability that the first ``j + 1`` drafts are all accepted is then
the cumulative product of the draft probabilities; its log is the *score*

    score[i, j] = sum(log_probs[i, :j + 1])

and the expected number of accepted tokens when request ``i`` verifies ``L_i`` drafts is
``sum_{j < L_i} exp(score[i, j])``.  Scores never increase along a request, so taking the
``C`` highest-scoring positions of the whole batch picks a prefix of each request's
draft, and it maximises the total expected accepted tokens among all length vectors with
``sum(L) <= C`` (each chosen position adds its own term, and a top-``C`` set that is
closed under prefixes is feasible).

Everything here is pure numpy: no vLLM, no torch.  The vLLM glue is ``spec_adapter.py``;
the log-probs TETRIS ranks with are the *calibrated* acceptance probabilities of
``calibration.py`` (the raw draft probabilities of a small draft are far from acceptance
rates), and the budget ``C`` of each step comes from ``smartspec.py`` (``budget="goodput"``)
or is ``N * k`` (``budget="fixed"``).

Rules (all deterministic):

* **Sanitising.**  ``NaN`` log-probs count as ``-inf`` (no confidence); values above 0
  (round-off on probabilities of 1) are clipped to 0, so scores are non-increasing along
  every request whatever the input.
* **Invalid positions are never chosen.**  A position is invalid when its score is
  ``-inf`` (some draft at or before it has probability 0: it can add nothing to the
  expected accepted tokens) or when it lies at or beyond the request's
  ``valid_lengths`` entry.  Consequently fewer than ``C`` positions may be chosen.
  (Because ``-inf`` propagates along the cumulative sum, an invalid position is always
  followed by invalid ones: the prefix property holds.)
* **Ties.**  Valid positions are ranked by ``(score descending, position j ascending,
  request index i ascending)`` and the first ``C`` are taken.  Position-ascending keeps
  the prefix property under equal scores (a later position of a request never beats an
  earlier one); request-ascending means that between two requests with *exactly* equal
  score at the same position, the one in the lower row wins.  So permuting the rows of
  the input permutes the result, except that such an exact tie straddling the capacity
  boundary is always resolved in favour of whichever request sits in the lower row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BUDGET_MODES",
    "TetrisConfig",
    "draft_scores",
    "expected_accepted",
    "plan",
    "rank_positions",
    "select_draft_lengths",
]

# "fixed": verify N * k drafts per step (the budget of standard speculative decoding);
# "goodput": SmartSpec, 0..N * (k + e) per step by predicted goodput (smartspec.py).
BUDGET_MODES = ("goodput", "fixed")


@dataclass(frozen=True)
class TetrisConfig:
    """TETRIS knobs for one decode engine.

    k: the standard window; the default capacity is ``N * k`` per step.
    extra: extra proposals ``e``; the draft model proposes ``k + extra`` tokens per request
        (vLLM's ``num_speculative_tokens`` must equal ``k + extra``).
    capacity: verification budget per step in draft tokens; ``None`` means ``N * k`` for
        the step's ``N`` requests.
    min_batch_size: with fewer requests than this, every request simply verifies
        ``min(k, valid)`` drafts (plain window ``k``).
    enabled: ``False`` gives plain window ``k`` for every batch (the baseline, with the
        same ``k + extra`` proposals); under ``budget="goodput"`` every request then verifies
        the same number of drafts (SmartSpec's uniform length), chosen per step.
    budget: ``"fixed"`` (``capacity``, else ``N * k``, every step) or ``"goodput"`` (per step,
        the budget in ``0..N * (k + extra)`` with the best predicted goodput; ``capacity``,
        when set, caps it).
    calibrate: rank with calibrated acceptance probabilities (``calibration.py``) instead
        of the raw draft probabilities.
    """

    k: int
    extra: int = 1
    capacity: int | None = None
    min_batch_size: int = 2
    enabled: bool = True
    budget: str = "fixed"
    calibrate: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"TetrisConfig.k must be >= 1, got {self.k}")
        if self.extra < 0:
            raise ValueError(f"TetrisConfig.extra must be >= 0, got {self.extra}")
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"TetrisConfig.capacity must be >= 0 or None, got {self.capacity}")
        if self.min_batch_size < 0:
            raise ValueError(f"TetrisConfig.min_batch_size must be >= 0, got {self.min_batch_size}")
        if self.budget not in BUDGET_MODES:
            raise ValueError(f"TetrisConfig.budget must be one of {BUDGET_MODES}, got {self.budget!r}")

    @property
    def num_speculative_tokens(self) -> int:
        """What vLLM's ``speculative_config["num_speculative_tokens"]`` must be."""
        return self.k + self.extra

    def capacity_for(self, num_requests: int) -> int:
        return self.k * num_requests if self.capacity is None else self.capacity


def _as_log_probs(log_probs) -> np.ndarray:
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be 2-D [num_requests, num_drafts], got shape {lp.shape}")
    lp = np.where(np.isnan(lp), -np.inf, lp)
    return np.minimum(lp, 0.0)


def _as_valid_lengths(valid_lengths, n: int, m: int) -> np.ndarray:
    if valid_lengths is None:
        return np.full(n, m, dtype=np.int64)
    valid = np.asarray(valid_lengths, dtype=np.int64).reshape(-1)
    if valid.shape[0] != n:
        raise ValueError(f"valid_lengths has {valid.shape[0]} entries for {n} requests")
    if (valid < 0).any() or (valid > m).any():
        raise ValueError(f"valid_lengths must lie in 0..{m}, got {valid.tolist()}")
    return valid


def draft_scores(log_probs) -> np.ndarray:
    """Scores ``[N, M]``: the cumulative sums of the (sanitised) draft log-probs."""
    return np.cumsum(_as_log_probs(log_probs), axis=1)


def rank_positions(log_probs, *, valid_lengths=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every valid position in TETRIS order: ``(rows, cols, scores)``, best first.

    The order is ``(score descending, position ascending, row ascending)`` over positions
    with a finite score below their row's ``valid_lengths`` entry; any leading slice of it
    is closed under prefixes, so its first ``C`` entries are the TETRIS choice for budget
    ``C`` and ``cumsum(exp(scores))`` is the expected accepted drafts of every budget.
    """
    lp = _as_log_probs(log_probs)
    n, m = lp.shape
    valid = _as_valid_lengths(valid_lengths, n, m)
    scores = np.cumsum(lp, axis=1)
    pos = np.broadcast_to(np.arange(m, dtype=np.int64), (n, m))
    req = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], (n, m))
    ok = np.isfinite(scores) & (pos < valid[:, None])
    s, j, i = scores[ok], pos[ok], req[ok]
    # np.lexsort sorts by the last key first: score descending, then j, then i ascending.
    order = np.lexsort((i, j, -s))
    return i[order], j[order], s[order]


def select_draft_lengths(log_probs, capacity: int, *, valid_lengths=None) -> np.ndarray:
    """TETRIS selection: the per-request prefix lengths of the ``capacity`` best positions.

    log_probs: ``[N, M]`` draft log-probability of each proposed token (``M = k + e``);
        ``-inf`` and ``NaN`` allowed (see the module docstring for the rules).
    capacity: total number of draft tokens that may be verified this step (``>= 0``).
    valid_lengths: optional ``[N]`` ints in ``0..M``: how many proposals of each request
        exist; positions beyond are never chosen.

    Returns ``int64[N]`` lengths in ``0..M`` with ``sum <= capacity``; the chosen set of
    each request is the prefix of that length.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    lp = _as_log_probs(log_probs)
    n, m = lp.shape
    valid = _as_valid_lengths(valid_lengths, n, m)
    lengths = np.zeros(n, dtype=np.int64)
    if n == 0 or m == 0 or capacity == 0:
        return lengths
    rows, _, _ = rank_positions(lp, valid_lengths=valid)
    np.add.at(lengths, rows[:capacity], 1)
    return lengths


def plan(log_probs, config: TetrisConfig, *, valid_lengths=None) -> np.ndarray:
    """Lengths for one step under ``config``: TETRIS, or plain window ``k`` as a fallback.

    Plain window ``k`` (``min(k, valid)`` per request) applies when TETRIS is disabled or
    the batch has fewer than ``config.min_batch_size`` requests; otherwise
    ``select_draft_lengths`` with ``config.capacity`` (``None`` -> ``N * k``).
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be 2-D [num_requests, num_drafts], got shape {lp.shape}")
    n, m = lp.shape
    valid = _as_valid_lengths(valid_lengths, n, m)
    if not config.enabled or n < config.min_batch_size:
        return np.minimum(valid, config.k).astype(np.int64)
    return select_draft_lengths(lp, config.capacity_for(n), valid_lengths=valid)


def expected_accepted(log_probs, lengths) -> float:
    """Expected accepted draft tokens: ``sum_i sum_{j < lengths[i]} exp(score[i, j])``.

    Uses the same sanitising as the selection (NaN -> -inf, clip at 0).
    """
    scores = draft_scores(log_probs)
    n, m = scores.shape
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.shape[0] != n:
        raise ValueError(f"lengths has {lengths.shape[0]} entries for {n} requests")
    if (lengths < 0).any() or (lengths > m).any():
        raise ValueError(f"lengths must lie in 0..{m}, got {lengths.tolist()}")
    mask = np.arange(m)[None, :] < lengths[:, None]
    return float(np.exp(scores[mask]).sum())
