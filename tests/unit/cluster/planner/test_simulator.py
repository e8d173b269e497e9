"""The cluster simulator on cases worked out by hand, and the router policies it must call."""

from __future__ import annotations

import pytest

from cluster.config import AutoscalerConfig, PoolBounds
from cluster.planner.profile import Overheads
from cluster.planner.simulator import ClusterShape, SimOptions, SimRequest, make_workload, simulate
from router import autoscaler as scaling
from router import dispatcher, freeness
from tests.unit.cluster.planner.support import simple_profile

# simple_profile(): a step costs 10 ms + 1 ms per prompt token; a decode step 10 ms.
PREFILL_100_S = 0.01 + 0.1
STEP_S = 0.01


def by_index(result):
    return sorted(result.result.records, key=lambda r: r.index)


def test_single_instance_constant_rate_no_queue():
    """Requests 1 s apart never overlap: each sees one prefill step, then one decode step per
    further token."""
    reqs = [SimRequest(float(i), 100, 5) for i in range(5)]
    out = simulate(simple_profile(), ClusterShape(colocated=1), reqs)
    for rec in by_index(out):
        assert rec.ok
        assert rec.ttft_s == pytest.approx(PREFILL_100_S)
        assert rec.tpot_s == pytest.approx(STEP_S)
        assert rec.e2e_s == pytest.approx(PREFILL_100_S + 4 * STEP_S)
        assert rec.output_tokens == 5 and rec.chunk_tokens == [1] * 5
    assert out.result.completed == 5


def test_a_queue_builds_up_when_arrivals_outpace_service():
    """One sequence at a time (max_num_seqs=1): service takes 0.15 s, arrivals come every
    0.1 s, so request k waits 0.05 s more than request k-1 (a D/D/1 queue)."""
    service = PREFILL_100_S + 4 * STEP_S
    reqs = [SimRequest(0.1 * i, 100, 5) for i in range(8)]
    out = simulate(simple_profile(max_num_seqs=1), ClusterShape(colocated=1), reqs)
    for k, rec in enumerate(by_index(out)):
        assert rec.ttft_s == pytest.approx(PREFILL_100_S + k * (service - 0.1))
        assert rec.tpot_s == pytest.approx(STEP_S)


def test_overheads_add_to_ttft_and_e2e():
    profile = simple_profile(overheads=Overheads(dispatch_s=0.003, emit_s=0.002, handoff_s=0.0))
    out = simulate(profile, ClusterShape(colocated=1), [SimRequest(0.0, 100, 3)])
    rec = out.result.records[0]
    assert rec.ttft_s == pytest.approx(0.003 + PREFILL_100_S + 0.002)
    assert rec.e2e_s == pytest.approx(0.003 + PREFILL_100_S + 2 * STEP_S + 0.002)


def test_disaggregated_first_token_from_prefill_then_transfer_then_decode():
    """TTFT is the prefill step; the second token comes after the hand-off, the KV transfer
    (latency + bytes / bandwidth) and one decode step."""
    profile = simple_profile(overheads=Overheads(0.0, 0.0, handoff_s=0.004), kv_latency_s=0.001,
                             kv_bandwidth=1e6, kv_bytes_per_token=100.0)
    out = simulate(profile, ClusterShape(prefill=1, decode=1), [SimRequest(0.0, 100, 3)])
    rec = out.result.records[0]
    transfer = 0.001 + 100 * 100.0 / 1e6
    assert rec.ttft_s == pytest.approx(PREFILL_100_S)
    assert rec.chunk_times[1] == pytest.approx(PREFILL_100_S + 0.004 + transfer + STEP_S)
    assert rec.chunk_times[2] == pytest.approx(rec.chunk_times[1] + STEP_S)
    assert rec.served_by == ["prefill-0", "decode-0"]


def test_contention_slows_engines_that_share_a_host():
    """Two instances prefilling at once on one host with a pair slowdown of 2: each step takes
    twice as long; without contention they run at full speed."""
    reqs = [SimRequest(0.0, 100, 1), SimRequest(0.0, 100, 1)]
    shared = simulate(simple_profile(pair_slowdown=2.0), ClusterShape(colocated=2), reqs)
    assert [r.ttft_s for r in shared.result.records] == pytest.approx([2 * PREFILL_100_S] * 2)
    alone = simulate(simple_profile(pair_slowdown=2.0), ClusterShape(colocated=2), reqs,
                     SimOptions(contention=False))
    assert [r.ttft_s for r in alone.result.records] == pytest.approx([PREFILL_100_S] * 2)


def test_contention_retimes_a_step_in_progress():
    """Processor sharing: a step of 0.11 s alone that shares the host for its second half
    (pair slowdown 2) ends at 0.055 + 2 * 0.055."""
    reqs = [SimRequest(0.0, 100, 1), SimRequest(0.055, 100, 1)]
    out = simulate(simple_profile(pair_slowdown=2.0), ClusterShape(colocated=2), reqs)
    first = by_index(out)[0]
    assert first.ttft_s == pytest.approx(0.055 + 2 * 0.055)


def test_admission_control_rejects_past_max_in_flight():
    reqs = [SimRequest(0.0, 10, 2) for _ in range(3)]
    out = simulate(simple_profile(), ClusterShape(colocated=1), reqs, SimOptions(max_in_flight=1))
    assert out.result.completed == 1
    assert out.result.failed == {"RESOURCE_EXHAUSTED": 2}


def test_workload_matches_the_bench_generators():
    reqs = make_workload(50, 4.0, 128, 32, 0.5, 0.25, seed=3)
    assert len(reqs) == 50 and reqs[0].arrival_s == 0.0
    assert all(64 <= r.prompt_len <= 192 and 24 <= r.output_len <= 40 for r in reqs)
    assert make_workload(50, 4.0, 128, 32, 0.5, 0.25, seed=3) == reqs


def test_kv_preemption_recomputes_when_blocks_run_out():
    """Two sequences that together outgrow the cache: the later one is preempted, and still
    completes with every token."""
    profile = simple_profile(num_blocks=8, block_size=16)
    reqs = [SimRequest(0.0, 48, 40), SimRequest(0.0, 48, 40)]
    out = simulate(profile, ClusterShape(colocated=1), reqs)
    assert out.preemptions >= 1
    assert out.result.completed == 2
    assert all(r.output_tokens == 40 for r in out.result.records)


class _Spy:
    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)


def test_the_simulator_calls_the_routers_own_policies(monkeypatch):
    """Placement goes through router.dispatcher and router.freeness (patched here), not copies."""
    prefill = _Spy(monkeypatch, dispatcher, "fewest_queued_prompt_tokens")
    decode = _Spy(monkeypatch, freeness, "pick_dispatch")
    pairing = _Spy(monkeypatch, freeness, "pair_migrations")
    reqs = make_workload(20, 10.0, 64, 8, seed=1)
    out = simulate(simple_profile(), ClusterShape(prefill=1, decode=2), reqs, SimOptions(migration_interval_s=0.05))
    assert out.result.completed == 20
    assert prefill.calls == 20 and decode.calls == 20
    assert pairing.calls >= 1
    colocated = _Spy(monkeypatch, dispatcher, "least_loaded")
    simulate(simple_profile(), ClusterShape(colocated=2), reqs)
    assert colocated.calls == 20


def test_decode_placement_follows_freeness(monkeypatch):
    """With pick_dispatch forced to one instance, every request decodes there."""
    monkeypatch.setattr(freeness, "pick_dispatch", lambda views, *a, **k: "decode-1")
    out = simulate(simple_profile(), ClusterShape(prefill=1, decode=2), make_workload(10, 5.0, 32, 4, seed=2),
                   SimOptions(migration=False))
    assert {r.served_by[-1] for r in out.result.records} == {"decode-1"}


def test_autoscaler_scale_in_migrates_running_requests_first(monkeypatch):
    """Two decode instances, a capacity model that says one is plenty: the autoscaler removes
    one while it runs requests; they live-migrate (pick_dispatch chooses where) and finish."""
    config = AutoscalerConfig(enabled=True, bounds=(PoolBounds("decode", 1, 2),), interval_s=0.2, window_s=1.0,
                              scale_in_after=1, cooldown_s=0.0)
    capacity = scaling.FixedCapacity({"decode": scaling.PoolCapacity(decode_tokens_per_s=1e6),
                                      "prefill": scaling.PoolCapacity(prefill_tokens_per_s=1e6)})
    reqs = [SimRequest(0.01 * i, 32, 100) for i in range(6)]
    out = simulate(simple_profile(), ClusterShape(prefill=1, decode=2), reqs,
                   SimOptions(autoscaler=config, capacity=capacity, migration=False))
    ins = [d for _, d in out.decisions if d.action == scaling.IN and d.role == "decode"]
    assert len(ins) == 1 and "utilization" in ins[0].reason
    assert out.migrations >= 1
    assert out.result.completed == 6 and all(r.output_tokens == 100 for r in out.result.records)
    assert any(len(r.served_by) == 3 for r in out.result.records)  # prefill, decode-x, decode-y
    assert [n for _, role, n in out.pool_sizes if role == "decode"][-1] == 1


def test_autoscaler_ramp_takes_the_decode_pool_one_two_one():
    """A burst fills decode-0's queue (max 2 running): the queueing signal adds an instance; when
    the load is gone the pool shrinks back. Every request completes."""
    config = AutoscalerConfig(enabled=True, bounds=(PoolBounds("decode", 1, 2),), interval_s=0.1, window_s=0.5,
                              scale_out_after=1, scale_in_after=3, cooldown_s=0.5, max_waiting_per_instance=1)
    profile = simple_profile(max_num_seqs=2, overheads=Overheads(0.0, 0.0, 0.0, startup_s=0.3))
    burst = [SimRequest(0.01 * i, 16, 60) for i in range(10)]
    tail = [SimRequest(8.0 + i, 16, 4) for i in range(3)]
    out = simulate(profile, ClusterShape(prefill=1, decode=1), burst + tail,
                   SimOptions(autoscaler=config, migration=False))
    sizes = [n for _, role, n in out.pool_sizes if role == "decode"]
    compact = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert compact == [1, 2, 1]
    outs = [d for _, d in out.decisions if d.action == scaling.OUT]
    assert outs and outs[0].signal == "queue"
    assert out.result.completed == 13


def test_contention_models():
    from cluster.planner.profile import Contention

    linear = Contention(pair_slowdown=1.5)
    assert [linear.slowdown(k) for k in (1, 2, 3)] == [1.0, 1.5, 2.0]
    # A host of 2 / 1.5 engine-equivalents: one engine runs alone at full speed, two at 1/1.5;
    # the router taking 0.5 of it leaves 0.83 for the engines.
    host = Contention(pair_slowdown=1.5, cores=2 / 1.5)
    assert host.slowdown(1) == 1.0 and host.slowdown(2) == pytest.approx(1.5)
    assert host.slowdown(1, router_load=0.5) == pytest.approx(1 / (2 / 1.5 - 0.5))
    assert not Contention().shared and host.shared
