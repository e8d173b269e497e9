"""The pure parts of cluster.bench: arrivals, lengths, ITL, percentiles, goodput, results."""

import json
import math

import numpy as np
import pytest

from cluster.bench.harness import BenchConfig
from cluster.bench.plots import sweep_plot
from cluster.bench.records import (
    RequestRecord,
    build_result,
    goodput,
    meets_slo,
    peak_concurrency,
    per_token_itl,
    summarize,
)
from cluster.bench.report import compare_table
from cluster.bench.workload import arrival_offsets, corpus_passages, random_prompts, sample_lengths

# ---- arrivals


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, math.inf).tolist() == [0.0] * 5


def test_arrivals_start_at_zero_and_never_go_back():
    t = arrival_offsets(1000, 10.0, seed=3)
    assert t[0] == 0.0
    assert np.all(np.diff(t) >= 0)
    assert len(t) == 1000


def test_poisson_gaps_have_mean_one_over_rate_and_unit_cv():
    gaps = np.diff(arrival_offsets(20_001, 4.0, 1.0, seed=0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    # Exponential gaps: standard deviation equals the mean.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_the_mean_and_sets_the_spread(burstiness):
    gaps = np.diff(arrival_offsets(40_001, 2.0, burstiness, seed=1))
    assert gaps.mean() == pytest.approx(0.5, rel=0.04)
    # Gamma(shape k): coefficient of variation 1/sqrt(k); k < 1 is burstier than Poisson.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_arrivals_are_deterministic_given_the_seed():
    a = arrival_offsets(50, 3.0, 0.5, seed=7)
    assert np.array_equal(a, arrival_offsets(50, 3.0, 0.5, seed=7))
    assert not np.array_equal(arrival_offsets(50, 3.0, seed=7), arrival_offsets(50, 3.0, seed=8))


def test_zero_requests_have_no_arrivals():
    assert arrival_offsets(0, 1.0).size == 0


# ---- lengths


def test_fixed_lengths_without_range():
    assert sample_lengths(10, 64, 0.0, np.random.default_rng(0)).tolist() == [64] * 10


def test_ranged_lengths_stay_in_bounds_and_cover_them():
    lens = sample_lengths(5000, 100, 0.25, np.random.default_rng(0))
    assert lens.min() == 75 and lens.max() == 125


def test_lengths_never_drop_below_one():
    assert sample_lengths(100, 1, 0.9, np.random.default_rng(0)).min() >= 1


# ---- prompts


_TEXT = "".join(f"line {i}: x = {i} * 2\n" for i in range(2000))


def test_corpus_passages_are_deterministic_given_the_seed_and_start_on_a_line():
    def make(seed):
        rng = np.random.default_rng(seed)
        return [p.prompt for p in corpus_passages([10, 20], [5, 5], 3.0, rng, _TEXT)]

    a = make(0)
    assert a == make(0) and a != make(1)
    assert [len(p) for p in a] == [30, 60]
    assert all(p.startswith("line ") for p in a)


def test_random_prompts_avoid_special_ids():
    prompts = random_prompts([500], [1], vocab_size=8, exclude={0, 2}, rng=np.random.default_rng(0))
    ids = prompts[0].prompt
    assert len(ids) == 500 and set(ids) == {1, 3, 4, 5, 6, 7}


# ---- inter-token latency


def test_itl_divides_a_gap_by_the_tokens_in_the_message():
    # t=0: first token; t=1.0: 2 tokens; t=1.6: 3 tokens.
    itl = per_token_itl([0.0, 1.0, 1.6], [1, 2, 3])
    assert itl == pytest.approx([0.5, 0.5, 0.2, 0.2, 0.2])
    # Per token, the ITLs add up to the time between the first and the last message.
    assert sum(itl) == pytest.approx(1.6)


def test_itl_of_a_single_message_is_empty():
    assert per_token_itl([0.3], [4]) == []


def test_record_latencies():
    r = RequestRecord(0, 10, 5, status="OK", send_s=1.0, end_s=3.0,
                      chunk_times=[1.5, 2.0, 3.0], chunk_tokens=[1, 2, 2], output_tokens=5)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(2.0)
    assert r.tpot_s == pytest.approx((2.0 - 0.5) / 4)
    assert r.itl_s() == pytest.approx([0.25, 0.25, 0.5, 0.5])


def test_single_token_output_has_no_tpot():
    r = RequestRecord(0, 10, 1, status="OK", send_s=0.0, end_s=0.2, chunk_times=[0.2],
                      chunk_tokens=[1], output_tokens=1)
    assert r.tpot_s is None


# ---- percentiles


def test_summary_of_known_data_in_ms():
    s = summarize([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s.count == 100
    assert s.mean == pytest.approx(50.5)
    assert s.median == pytest.approx(50.5)
    assert s.p90 == pytest.approx(90.1)  # linear interpolation between 90 and 91
    assert s.p99 == pytest.approx(99.01)


def test_summary_of_constant_and_empty_data():
    s = summarize([0.02] * 7)
    assert (s.mean, s.median, s.p90, s.p99) == pytest.approx((20.0, 20.0, 20.0, 20.0))
    empty = summarize([])
    assert empty.count == 0 and empty.mean is None and empty.p99 is None


# ---- goodput


def test_a_request_missing_either_slo_does_not_count():
    samples = [(100.0, 10.0),   # meets both
               (300.0, 10.0),   # misses TTFT
               (100.0, 50.0),   # misses TPOT
               (200.0, 20.0)]   # exactly on both limits: meets
    assert goodput(samples, 2.0, slo_ttft_ms=200.0, slo_tpot_ms=20.0) == pytest.approx(1.0)


def test_goodput_with_one_slo_ignores_the_other_metric():
    samples = [(100.0, 10.0), (300.0, 10.0), (100.0, 50.0)]
    assert goodput(samples, 1.0, slo_ttft_ms=200.0, slo_tpot_ms=None) == pytest.approx(2.0)
    assert goodput(samples, 1.0, slo_ttft_ms=None, slo_tpot_ms=20.0) == pytest.approx(2.0)


def test_goodput_without_slo_is_request_throughput():
    samples = [(1e9, 1e9)] * 6
    assert goodput(samples, 3.0, None, None) == pytest.approx(2.0)


def test_missing_ttft_fails_a_ttft_slo_but_missing_tpot_passes():
    assert not meets_slo(None, 5.0, 100.0, None)
    assert meets_slo(50.0, None, 100.0, 10.0)


# ---- result building


def _record(i, status="OK", send=0.0, first=0.1, end=0.5, out=5, prompt=10):
    times = [first] + [first + (end - first) * k / (out - 1) for k in range(1, out)]
    if status != "OK":
        return RequestRecord(i, prompt, out, status=status, send_s=send)
    return RequestRecord(i, prompt, out, status=status, send_s=send, end_s=end, chunk_times=times,
                         chunk_tokens=[1] * out, prompt_tokens=prompt, output_tokens=out)


def test_build_result_counts_failures_by_status_and_throughput():
    records = [_record(0), _record(1, send=0.5, first=0.6, end=2.0),
               _record(2, status="UNAVAILABLE"), _record(3, status="UNAVAILABLE"),
               _record(4, status="INVALID_ARGUMENT")]
    cfg = BenchConfig(num_prompts=5, output_len=5, slo_ttft_ms=50.0)
    result = build_result(cfg, "m", records, duration_s=2.0)
    assert result.completed == 2
    assert result.failed == {"INVALID_ARGUMENT": 1, "UNAVAILABLE": 2}
    assert result.total_input_tokens == 20 and result.total_output_tokens == 10
    assert result.request_throughput == pytest.approx(1.0)
    assert result.output_throughput == pytest.approx(5.0)
    assert result.total_token_throughput == pytest.approx(15.0)
    assert result.goodput == 0.0  # both TTFTs are 100 ms > 50 ms
    assert result.ttft.mean == pytest.approx(100.0)
    assert result.warnings == []
    # JSON has no Infinity: the default infinite rate is written as "inf".
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["request_rate"] == "inf" and d["config"]["request_rate"] == "inf"
    assert d["p99_ttft_ms"] == pytest.approx(100.0)
    assert len(d["requests"]) == 5


def test_server_miscounting_tokens_is_flagged():
    r = _record(0, out=5)
    r.output_tokens = 4  # usage disagrees with what was streamed and with max_tokens
    result = build_result(BenchConfig(num_prompts=1, output_len=5), "m", [r], 1.0)
    assert len(result.warnings) == 2


def test_peak_concurrency():
    records = [_record(0, send=0.0, end=1.0), _record(1, send=0.5, first=0.6, end=1.5),
               _record(2, send=1.0, first=1.1, end=2.0)]
    assert peak_concurrency(records) == 2  # the first ends as the third starts


# ---- comparison helpers


def _flat(label, rate, ttft):
    return {"label": label, "request_rate": rate, "request_throughput": 2.0, "goodput": 1.0,
            "median_ttft_ms": ttft, "p90_ttft_ms": ttft * 2, "p99_ttft_ms": ttft * 3,
            "median_tpot_ms": 10.0, "p90_tpot_ms": 12.0, "p99_tpot_ms": None}


def test_compare_table_shows_ratios_to_the_first_column():
    table = compare_table({"colocated": _flat("colocated", 1, 100.0),
                           "disagg": _flat("disagg", 1, 50.0)})
    line = next(ln for ln in table.splitlines() if ln.startswith("p50 TTFT"))
    assert "100.00" in line and "50.00 (x0.50)" in line
    assert table.splitlines()[0].split()[1:] == ["colocated", "disagg"]


def test_sweep_plot_writes_a_png(tmp_path):
    results = [_flat("a", r, 10.0 * i) for i, r in enumerate([1, 2, "inf"], 1)]
    results += [_flat("b", r, 5.0 * i) for i, r in enumerate([1, 2], 1)]
    path = tmp_path / "sweep.png"
    sweep_plot(results, "request_rate", str(path), "sweep")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
