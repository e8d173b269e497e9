"""The speculation counters (decode_worker/spec_stats.py) fill every field of the gRPC
SpecDecodeStats message the router builds from them."""

from __future__ import annotations

import pytest

from decode_worker.spec_stats import BUDGET_BUCKET_BOUNDS, TetrisStats
from proto import disagg_pb2 as pb


def test_snapshot_fills_every_proto_field_and_builds_the_message():
    stats = TetrisStats(num_speculative_tokens=5, budget_mode="goodput")
    with stats._lock:
        for budget in (0, 1, 7, 600):
            stats.add_budget(budget)
        stats.step_time_samples, stats.step_time_predicted_sum_s, stats.step_time_measured_sum_s = 2, 0.02, 0.03
    snap = stats.snapshot()
    fields = set(pb.SpecDecodeStats.DESCRIPTOR.fields_by_name)
    assert fields <= set(snap), fields - set(snap)
    # What router/server.py does with it.
    msg = pb.SpecDecodeStats(**{k: v for k, v in snap.items() if k in fields and v is not None})
    assert msg.budget_mode == "goodput" and msg.steps_without_speculation == 1
    assert list(msg.budget_bucket_counts) == [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert list(msg.budget_bucket_bounds)[-1] == float("inf")
    assert msg.step_time_predicted_mean_ms == pytest.approx(10.0)
    assert msg.step_time_measured_mean_ms == pytest.approx(15.0)
    assert len(msg.proposal_length_steps) == 6


def test_budget_buckets_are_inclusive_upper_bounds():
    stats = TetrisStats(num_speculative_tokens=2)
    for bound in BUDGET_BUCKET_BOUNDS[:-1]:
        stats.add_budget(int(bound))
    assert stats.budget_bucket_counts[:-1] == [1] * (len(BUDGET_BUCKET_BOUNDS) - 1)
    assert stats.budget_sum == sum(int(b) for b in BUDGET_BUCKET_BOUNDS[:-1])
