"""`plan`: the placement search agrees with a brute-force simulation, the serve config it writes
is one `up --config` takes, workloads from files, and Mélange's mix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cluster.entrypoints import cli
from cluster.planner.capacity import ProfileCapacity, capacity_table, decode_tokens_per_s, max_decode_batch
from cluster.planner.melange import solve_mix
from cluster.planner.plan import (
    SearchSpace,
    Slo,
    Workload,
    attainment_at,
    candidate_shapes,
    max_goodput,
    plan,
    serve_config,
)
from cluster.planner.profile import StepCostModel
from cluster.planner.simulator import ClusterShape
from router.autoscaler import TableCapacity
from tests.unit.cluster.planner.support import simple_profile

# Decode steps cost 10 ms + 1 ms per sequence; a prompt 1 ms per token. Under a 25 ms TPOT a
# colocated engine's steps that carry a prompt break the TPOT of every sequence in them.
PROFILE = simple_profile(const_s=0.01, per_prompt_token_s=0.001, per_decode_seq_s=0.001)
WORKLOAD = Workload(rate=4.0, input_len=100, output_len=20, input_len_range=0.5)
SLO = Slo(ttft_ms=500, tpot_ms=25, attainment=0.9)
SPACE = SearchSpace(max_per_pool=2, max_gpus=3)
NUM = 100


def brute_force_goodput(shape: ClusterShape, step: float = 0.5, top: float = 24.0) -> float:
    """The largest rate on a fixed grid at which the simulator meets the attainment target
    (trials sized like max_goodput's)."""
    best = 0.0
    for rate in np.arange(step, top + step, step):
        n = max(NUM, int(np.ceil(rate * 10.0)))
        if attainment_at(PROFILE, shape, WORKLOAD, SLO, float(rate), n).attainment >= SLO.attainment:
            best = float(rate)
    return best


def test_plan_picks_what_brute_force_simulation_says_is_best():
    result = plan(PROFILE, WORKLOAD, SLO, SPACE, num_requests=NUM, min_duration_s=10.0)
    shapes = candidate_shapes(PROFILE, SPACE)
    brute = {s: brute_force_goodput(s) for s in shapes}
    best_brute = max(shapes, key=lambda s: (brute[s] / s.gpus, -s.gpus))
    assert result.ranked[0].shape == best_brute, {s.label: (brute[s], brute[s] / s.gpus) for s in shapes}
    for c in result.ranked:  # the bisection lands within one grid step of the grid's answer
        assert c.goodput == pytest.approx(brute[c.shape], abs=0.5 + 0.03 * brute[c.shape])
    # What it serves the asked rate with: the fewest GPUs among replicated top units that meet
    # the SLOs there in simulation.
    served = result.serve_shape
    assert result.best.at_rate.attainment >= SLO.attainment
    assert served.gpus == min(c.gpus * max(1, int(np.ceil(WORKLOAD.rate / c.goodput)))
                              for c in result.ranked[:5] if c.goodput > 0)


def test_goodput_is_zero_when_nothing_meets_the_slo():
    impossible = Slo(ttft_ms=1, tpot_ms=1, attainment=0.9)
    assert max_goodput(PROFILE, ClusterShape(colocated=1), WORKLOAD, impossible, 50) == 0.0


def test_serve_config_is_accepted_by_up(tmp_path):
    doc = serve_config(ClusterShape(prefill=2, decode=3), PROFILE, model="/models/m")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = cli.serve_config_from_args(cli.parse_args(["up", "--config", str(path)]))
    assert {p.role: p.num_instances for p in config.pools} == {"prefill": 2, "decode": 3}
    assert config.engine.model == "/models/m" and config.engine.max_num_seqs == PROFILE.max_num_seqs


def test_workload_files(tmp_path):
    spec = tmp_path / "w.yaml"
    spec.write_text("rate: 3\ninput-len: 200\noutput-len: 50\ninput-len-range: 0.2\n")
    w = Workload.from_file(spec)
    assert (w.rate, w.input_len, w.output_len, w.input_len_range) == (3.0, 200, 50, 0.2)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"request_rate": 2.0, "requests": [  # one gap of 0.5 s: 2 req/s
        {"scheduled_s": 0.0, "target_input_len": 10, "target_output_len": 5},
        {"scheduled_s": 0.5, "target_input_len": 30, "target_output_len": 7}]}))
    replay = Workload.from_file(bench)
    assert (replay.input_len, replay.output_len) == (20, 6)
    reqs = replay.requests(4, rate=4.0)  # the trace, looped, at twice its rate
    assert [r.prompt_len for r in reqs] == [10, 30, 10, 30]
    assert reqs[1].arrival_s == pytest.approx(0.25)
    with pytest.raises(ValueError, match="rate, input-len and output-len"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("rate: 3\n")
        Workload.from_file(bad)


def test_capacity_closed_forms():
    # Decode batch b costs 10 + b ms: within a 25 ms TPOT, b = 15 -> 15 / 25 ms = 600 tokens/s.
    assert max_decode_batch(PROFILE, 1, 100, 20, 0.025) == 15
    assert decode_tokens_per_s(PROFILE, 1, 100, 20, 0.025) == pytest.approx(600.0)
    cap = ProfileCapacity(PROFILE, 0.025).capacity("decode", 100, 20)
    assert cap.decode_tokens_per_s == pytest.approx(600.0)
    table = TableCapacity(capacity_table(PROFILE, {"decode": 1}, 0.025, ("decode",)))
    assert table.capacity("decode", 128, 16).decode_tokens_per_s == pytest.approx(
        decode_tokens_per_s(PROFILE, 1, 128, 16, 0.025))
    assert table.capacity("prefill", 128, 16) is None


def test_melange_ilp_mixes_types_when_that_is_cheaper():
    # Two buckets; type A ($1) is good at bucket 0 only, type B ($3) at both.
    capacity = np.array([[10.0, 10.0], [0.0, 10.0]])
    counts, assignment, status = solve_mix(np.array([9.0, 9.0]), capacity, np.array([1.0, 3.0]), [None, None])
    assert status == "optimal" and counts == [1, 1]
    assert assignment[1, 0] == 0.0 and assignment[1, 1] == pytest.approx(1.0)
    # Only B available: two of them.
    counts, _, _ = solve_mix(np.array([9.0, 9.0]), capacity, np.array([1.0, 3.0]), [0, None])
    assert counts == [0, 2]


def test_synthetic_13b_disaggregation_wins_per_gpu_under_a_tight_tpot():
    """DistServe's qualitative result on the synthesized A100 profile: at a tight TPOT the best
    disaggregated unit has more goodput per GPU than the best colocated one; at a loose TPOT
    colocation catches up."""
    from cluster.planner.synthetic import preset

    profile = preset("llama-2-13b@a100-80gb")
    w = Workload(rate=8, input_len=512, output_len=128, input_len_range=0.5, output_len_range=0.5)
    shapes = [ClusterShape(colocated=1), ClusterShape(colocated=2), ClusterShape(prefill=1, decode=2)]

    def per_gpu(tpot_ms: float) -> dict[str, float]:
        slo = Slo(1000, tpot_ms, 0.9)
        return {s.label: max_goodput(profile, s, w, slo, 100) / s.gpus for s in shapes}

    tight = per_gpu(30)
    assert tight["1P+2D"] > 1.3 * max(tight["colocated-1"], tight["colocated-2"])
    loose = per_gpu(100)
    assert max(loose["colocated-1"], loose["colocated-2"]) > loose["1P+2D"]


def test_step_cost_fit_recovers_known_coefficients():
    from cluster.planner.profile import StepSample

    true = StepCostModel(const_s=0.005, per_prefill_token_s=2e-4, per_decode_seq_s=1e-3, per_context_token_s=1e-6)
    samples = [StepSample(p, 1 if p else 0, d, d * c, true.step_seconds(p, 1 if p else 0, d, d * c))
               for p in (0, 64, 256, 512) for d in (0, 1, 8, 32) for c in (100, 700) if p or d]
    fit = StepCostModel.fit(samples)
    assert max(abs(e) for e in fit.relative_errors(samples)) < 1e-6
    assert fit.per_decode_seq_s == pytest.approx(1e-3, rel=1e-4)


def test_profile_json_round_trip(tmp_path):
    path = PROFILE.save(tmp_path / "p.json")
    from cluster.planner.profile import Profile

    again = Profile.load(path)
    assert again == PROFILE
    with pytest.raises(ValueError, match="cannot read profile"):
        Profile.load(tmp_path / "missing.json")
