"""The counters of one speculating engine (TETRIS + SmartSpec), as the load reports carry them.

Written by the scheduler-side hook (``spec_scheduler.py``) on the engine thread, read by
``snapshot()`` from any thread.  ``snapshot()``'s keys are the fields of the gRPC message
``SpecDecodeStats`` (proto/disagg.proto); the router copies them into ``status`` and
Prometheus.  Pure Python; no vLLM.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUDGET_BUCKET_BOUNDS", "StepRecord", "TetrisStats"]

# Upper bounds (inclusive) of the budget histogram's buckets, in draft tokens per step.
BUDGET_BUCKET_BOUNDS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, float("inf"))


@dataclass
class StepRecord:
    """One draft-selection decision (made after step t) and its verification (in step t+1)."""

    num_requests: int  # live decode requests planned over
    capacity: int  # budget used (fixed: N * k or --spec-capacity; goodput: the chosen budget)
    proposed: int  # draft tokens proposed for them
    planned: int  # draft tokens left after trimming (sent to the scheduler)
    source: str  # "probs" | "greedy" | "window" (no confidence / fallback / disabled)
    lengths: list[int] = field(default_factory=list)
    reason: str = "fixed"  # fixed | goodput | no-gain | explore | warmup | no-confidence
    expected_accepted: float = 0.0  # predicted from calibrated probabilities
    verified: int | None = None  # filled when the next step books: drafts really verified
    accepted: int | None = None
    verified_requests: int | None = None


@dataclass
class TetrisStats:
    """Counters of one engine with TETRIS installed (totals over its life)."""

    num_speculative_tokens: int
    budget_mode: str = "fixed"
    steps: int = 0  # decisions with at least one live decode request
    request_steps: int = 0  # sum over decisions of live decode requests
    proposed: int = 0  # draft tokens proposed for those requests
    planned: int = 0  # draft tokens kept by TETRIS
    verified: int = 0  # draft tokens the scheduler really sent to verification
    accepted: int = 0  # of those, accepted by the target
    verified_request_steps: int = 0  # request-steps booked after a decision
    window_fallbacks: int = 0  # decisions that used plain window k
    steps_without_speculation: int = 0  # engine steps whose requests verified no draft
    draft_skipped_steps: int = 0  # engine steps in which the draft model did not run (K = 0)
    explorations: int = 0
    proposal_length_steps: list[int] = field(default_factory=list)  # [K] engine steps drafting K
    budget_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(BUDGET_BUCKET_BOUNDS))
    budget_sum: int = 0
    expected_accepted: float = 0.0  # sum of the predicted accepted drafts of booked decisions
    coupled_request_steps: int = 0  # seeded request-steps drafted and verified coupled
    # Calibration (Brier scores of the raw draft probability and of the calibrated one).
    calibration_observations: int = 0
    calibration_brier_raw: float = 0.0
    calibration_brier_calibrated: float = 0.0
    # Step-time model: predicted vs measured over the steps it predicted.
    step_time_samples: int = 0
    step_time_predicted_sum_s: float = 0.0
    step_time_measured_sum_s: float = 0.0
    step_time_abs_error_sum_s: float = 0.0
    # From vLLM's own SpecDecodingStats (only when the engine logs stats).
    vllm_draft_tokens: int = 0
    vllm_accepted_tokens: int = 0
    vllm_stats_seen: bool = False
    history: deque = field(default_factory=lambda: deque(maxlen=4096))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.proposal_length_steps:
            self.proposal_length_steps = [0] * (self.num_speculative_tokens + 1)

    def add_budget(self, budget: int) -> None:
        """Histogram one step's verification budget (call under ``_lock``)."""
        for i, bound in enumerate(BUDGET_BUCKET_BOUNDS):
            if budget <= bound:
                self.budget_bucket_counts[i] += 1
                break
        self.budget_sum += budget
        if budget == 0:
            self.steps_without_speculation += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified draft tokens."""
        return self.accepted / self.verified if self.verified else 0.0

    @property
    def mean_accepted_per_request_step(self) -> float:
        """Accepted draft tokens per decode request-step (each also yields one more token)."""
        return self.accepted / self.verified_request_steps if self.verified_request_steps else 0.0

    @property
    def trim_ratio(self) -> float:
        return self.planned / self.proposed if self.proposed else 0.0

    def _mean_ms(self, total_s: float) -> float:
        return 1000.0 * total_s / self.step_time_samples if self.step_time_samples else 0.0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "num_speculative_tokens": self.num_speculative_tokens,
                "budget_mode": self.budget_mode,
                "steps": self.steps,
                "request_steps": self.request_steps,
                "proposed": self.proposed,
                "planned": self.planned,
                "verified": self.verified,
                "accepted": self.accepted,
                "verified_request_steps": self.verified_request_steps,
                "window_fallbacks": self.window_fallbacks,
                "acceptance_rate": self.acceptance_rate,
                "mean_accepted_per_request_step": self.mean_accepted_per_request_step,
                "steps_without_speculation": self.steps_without_speculation,
                "draft_skipped_steps": self.draft_skipped_steps,
                "explorations": self.explorations,
                "proposal_length_steps": list(self.proposal_length_steps),
                "budget_bucket_bounds": list(BUDGET_BUCKET_BOUNDS),
                "budget_bucket_counts": list(self.budget_bucket_counts),
                "budget_sum": self.budget_sum,
                "expected_accepted": self.expected_accepted,
                "coupled_request_steps": self.coupled_request_steps,
                "calibration_observations": self.calibration_observations,
                "calibration_brier_raw": self.calibration_brier_raw,
                "calibration_brier_calibrated": self.calibration_brier_calibrated,
                "step_time_samples": self.step_time_samples,
                "step_time_predicted_mean_ms": self._mean_ms(self.step_time_predicted_sum_s),
                "step_time_measured_mean_ms": self._mean_ms(self.step_time_measured_sum_s),
                "step_time_abs_error_mean_ms": self._mean_ms(self.step_time_abs_error_sum_s),
                "vllm_draft_tokens": self.vllm_draft_tokens if self.vllm_stats_seen else None,
                "vllm_accepted_tokens": self.vllm_accepted_tokens if self.vllm_stats_seen else None,
            }
