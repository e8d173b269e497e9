"""The autoscaling policy: utilization against a capacity model, queueing and memory signals,
hysteresis, cool-down, bounds, the scale-in victim and the reasons it gives."""

from __future__ import annotations

import pytest

from cluster.config import AutoscalerConfig, PoolBounds
from router.autoscaler import (
    HOLD,
    IN,
    OUT,
    Autoscaler,
    FixedCapacity,
    PoolCapacity,
    PoolLoad,
    demand_instances,
    scale_in_victim,
)

# One decode instance sustains 1000 output tokens/s; a request has 100 output tokens, so one
# instance carries 10 req/s at 100% utilization.
CAPACITY = FixedCapacity({"decode": PoolCapacity(decode_tokens_per_s=1000.0),
                          "prefill": PoolCapacity(prefill_tokens_per_s=10_000.0),
                          "colocated": PoolCapacity(prefill_tokens_per_s=10_000.0, decode_tokens_per_s=1000.0)})


def config(**kw) -> AutoscalerConfig:
    base = dict(enabled=True, bounds=(PoolBounds("decode", 1, 4),), target_utilization=0.75,
                scale_in_utilization=0.45, scale_out_after=2, scale_in_after=3, cooldown_s=10.0)
    base.update(kw)
    return AutoscalerConfig(**base)


def decode(ready: int, rate: float, **kw) -> PoolLoad:
    instances = kw.pop("instances", tuple((f"decode-{i}", 2) for i in range(ready)))
    return PoolLoad("decode", ready, arrival_rate=rate, mean_prompt_tokens=200, mean_output_tokens=100,
                    instances=instances, **kw)


def test_demand_from_arrivals_or_measured_token_rates():
    cap = CAPACITY.per_role
    assert demand_instances(decode(1, 5.0), cap["decode"]) == pytest.approx(0.5)
    measured = PoolLoad("decode", 1, output_tokens_per_s=2500.0)
    assert demand_instances(measured, cap["decode"]) == pytest.approx(2.5)
    colocated = PoolLoad("colocated", 1, arrival_rate=5.0, mean_prompt_tokens=200, mean_output_tokens=100)
    assert demand_instances(colocated, cap["colocated"]) == pytest.approx(5 * 200 / 10_000 + 0.5)
    assert demand_instances(decode(1, 5.0), None) is None


def test_scale_out_needs_consecutive_evaluations_then_sizes_to_the_load():
    a = Autoscaler(config(), CAPACITY)
    first = a.evaluate(0.0, [decode(1, 20.0)])[0]  # utilization 2.0
    assert first.action == HOLD and "(1/2 evaluations)" in first.reason and "utilization 2.00" in first.reason
    second = a.evaluate(1.0, [decode(1, 20.0)])[0]
    # 20 req/s needs 2 instances at 100%, ceil(2 / 0.75) = 3 at the target.
    assert (second.action, second.target, second.signal) == (OUT, 3, "utilization")


def test_a_blip_does_not_scale_hysteresis_resets_the_count():
    a = Autoscaler(config(), CAPACITY)
    assert a.evaluate(0.0, [decode(1, 20.0)])[0].action == HOLD
    assert a.evaluate(1.0, [decode(1, 5.0)])[0].action == HOLD  # back within the band
    assert a.evaluate(2.0, [decode(1, 20.0)])[0].action == HOLD  # counting from 1 again


def test_the_band_between_the_two_utilizations_changes_nothing():
    a = Autoscaler(config(scale_in_after=1), CAPACITY)
    # 2 instances at 6 req/s: utilization 0.3; with one fewer 0.6 > 0.45: stays.
    d = a.evaluate(0.0, [decode(2, 6.0)])[0]
    assert d.action == HOLD and "within the band" in d.reason and "0.60 > 0.45" in d.reason


def test_scale_in_after_its_evaluations_removes_the_least_loaded_instance():
    a = Autoscaler(config(), CAPACITY)
    instances = (("decode-0", 3), ("decode-1", 1), ("decode-2", 1))
    load = decode(3, 2.0, instances=instances)  # utilization 0.067; with 2: 0.1
    assert [a.evaluate(float(t), [load])[0].action for t in range(2)] == [HOLD, HOLD]
    d = a.evaluate(2.0, [load])[0]
    assert (d.action, d.target, d.instance_id, d.signal) == (IN, 2, "decode-2", "utilization")
    assert "with 2 instance(s) 0.10 <= 0.45" in d.reason


def test_cool_down_holds_after_a_change():
    a = Autoscaler(config(scale_out_after=1, cooldown_s=10.0), CAPACITY)
    assert a.evaluate(0.0, [decode(1, 20.0)])[0].action == OUT
    d = a.evaluate(5.0, [decode(3, 40.0)])[0]
    assert d.action == HOLD and "cool-down, 5s left" in d.reason
    assert a.evaluate(10.5, [decode(3, 40.0)])[0].action == OUT


def test_bounds_win_over_everything():
    a = Autoscaler(config(bounds=(PoolBounds("decode", 2, 3),), scale_out_after=1), CAPACITY)
    below = a.evaluate(0.0, [decode(1, 0.0)])[0]
    assert (below.action, below.target, below.signal) == (OUT, 2, "bounds") and "below the minimum 2" in below.reason
    at_max = a.evaluate(100.0, [decode(3, 100.0)])[0]
    assert at_max.action == HOLD and "already at the maximum 3" in at_max.reason
    above = a.evaluate(200.0, [decode(4, 100.0)])[0]
    assert (above.action, above.signal) == (IN, "bounds")
    capped = Autoscaler(config(bounds=(PoolBounds("decode", 1, 2),), scale_out_after=1), CAPACITY)
    assert capped.evaluate(0.0, [decode(1, 100.0)])[0].target == 2  # wants 14, gets the max


def test_queueing_and_memory_signals_scale_out_without_a_capacity_model():
    a = Autoscaler(config(scale_out_after=1, max_waiting_per_instance=2.0, min_freeness=1.0), None)
    queued = a.evaluate(0.0, [decode(2, 5.0, waiting=5)])[0]
    assert (queued.action, queued.target, queued.signal) == (OUT, 3, "queue")
    assert "5 request(s) waiting (> 2 per instance)" in queued.reason
    b = Autoscaler(config(scale_out_after=1), None)
    memory = b.evaluate(0.0, [decode(1, 5.0, mean_freeness=0.5)])[0]
    assert (memory.action, memory.signal) == (OUT, "memory") and "KV memory" in memory.reason


def test_without_a_capacity_model_scale_in_only_when_idle():
    a = Autoscaler(config(scale_in_after=1), None)
    busy = a.evaluate(0.0, [decode(2, 1.0)])[0]
    assert busy.action == HOLD and "scales in only when idle" in busy.reason
    idle = a.evaluate(1.0, [decode(2, 0.0)])[0]
    assert (idle.action, idle.signal) == (IN, "idle")


def test_nothing_while_an_action_is_under_way():
    a = Autoscaler(config(scale_out_after=1), CAPACITY)
    d = a.evaluate(0.0, [decode(1, 40.0, starting=1)])[0]
    assert d.action == HOLD and "1 starting" in d.reason


def test_pools_without_bounds_get_no_decision():
    a = Autoscaler(config(), CAPACITY)
    decisions = a.evaluate(0.0, [decode(1, 5.0), PoolLoad("prefill", 1, arrival_rate=100.0)])
    assert [d.role for d in decisions] == ["decode"]


def test_victim_ties_go_to_the_newest_instance():
    load = PoolLoad("decode", 3, instances=(("decode-2", 1), ("decode-10", 1), ("decode-1", 0)))
    assert scale_in_victim(load) == "decode-1"
    tie = PoolLoad("decode", 2, instances=(("decode-2", 1), ("decode-10", 1)))
    assert scale_in_victim(tie) == "decode-10"
    assert scale_in_victim(PoolLoad("decode", 0)) is None


def test_config_validation():
    with pytest.raises(ValueError, match="scale_in_utilization < target_utilization"):
        AutoscalerConfig(target_utilization=0.5, scale_in_utilization=0.6)
    with pytest.raises(ValueError, match="min <= max"):
        PoolBounds("decode", 3, 2)
    with pytest.raises(ValueError, match="twice"):
        AutoscalerConfig(bounds=(PoolBounds("decode", 1, 2), PoolBounds("decode", 1, 3)))
    with pytest.raises(ValueError, match="unknown pool"):
        PoolBounds("router", 1, 2)
