"""The pure parts of the migration studies (cluster/bench/studies/migration.py): KV sizing, the
client's view of a migration's stall, the downtime table and its goals, the skew table."""

import argparse

import pytest

from cluster.bench.records import RequestRecord
from cluster.bench.studies import STUDIES, load_study
from cluster.bench.studies import migration as mb
from cluster.models.random_weights import RANDOM_PRESETS, RandomPreset


def test_both_studies_are_registered_with_the_cli():
    for name in ("migration-downtime", "migration-skew"):
        study = load_study(name)
        parser = argparse.ArgumentParser()
        study.add_args(parser)
        assert callable(study.main)
        assert parser.parse_args([]).out == "bench-results"
    assert load_study("tetris").__name__ == STUDIES["tetris"]


def test_cli_parses_the_migration_suites():
    from cluster.entrypoints.cli import parse_args

    args = parse_args(["bench-suite", "migration-downtime", "--quick", "--lengths", "256,512"])
    assert args.study == "migration-downtime" and args.quick and args.lengths == "256,512"
    args = parse_args(["bench-suite", "migration-skew", "--runs", "off,on"])
    assert args.study == "migration-skew" and args.runs == "off,on"


def test_kv_heavy_preset_has_64_kib_of_kv_per_token():
    preset = RANDOM_PRESETS["kv-heavy"]
    assert isinstance(preset, RandomPreset) and preset.max_position_embeddings == 8192
    config = {"num_hidden_layers": preset.num_layers, "num_attention_heads": preset.num_heads,
              "num_key_value_heads": preset.num_kv_heads, "hidden_size": preset.hidden_size,
              "dtype": preset.dtype}
    assert mb.kv_bytes_per_token(config) == 64 * 1024
    assert mb.kv_bytes_per_token(config, dtype_bytes=2) == 32 * 1024


def test_kv_bytes_use_head_dim_when_given():
    config = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 256, "head_dim": 128, "dtype": "bfloat16"}
    assert mb.kv_bytes_per_token(config) == 4 * 2 * 128 * 2 * 2


def test_cache_gib_rounds_up_to_whole_blocks_plus_the_null_block():
    # 100 tokens in blocks of 32: 4 blocks, plus vLLM's null block.
    assert mb.cache_gib(100, 1024, 32) == pytest.approx(5 * 32 * 1024 / (1 << 30))


def test_stream_gaps_separates_the_migration_stall_from_normal_itl():
    times = [0.0, 1.0, 1.1, 1.2, 1.9, 2.0, 2.1]
    counts = [1, 1, 1, 1, 1, 2, 1]
    gaps = mb.stream_gaps(times, counts, (1.15, 1.95))
    assert gaps["max_gap_s"] == pytest.approx(0.7)  # 1.2 -> 1.9 ended inside the window
    # Outside: 1.0 (first decode gap), 0.1, then 0.1 over 2 tokens (0.05 each), 0.1.
    assert gaps["median_itl_s"] == pytest.approx(0.1)


def test_stream_gaps_without_a_window_is_plain_itl():
    gaps = mb.stream_gaps([0.0, 0.5, 0.6, 0.7], [1, 1, 1, 1], (float("inf"), float("inf")))
    assert gaps["max_gap_s"] is None
    assert gaps["median_itl_s"] == pytest.approx(0.1)


def _trial(length, mode, downtime, equal=True, state="committed", itl=10.0):
    phases = {} if downtime is None else {"stop": downtime / 2, "first_token": downtime / 4}
    return {"length": length, "mode": mode, "state": state, "downtime_ms": downtime,
            "client_max_gap_ms": downtime, "client_median_itl_ms": itl, "blocks_copied": 1, "stages": 1,
            "equal": equal, "phases_ms": phases}


def test_downtime_summary_medians_ratios_and_goals():
    trials = [
        _trial(256, "live", 10), _trial(256, "live", 12), _trial(256, "live", 50),
        _trial(256, "stop_copy", 20), _trial(256, "recompute", 40),
        _trial(4096, "live", 12), _trial(4096, "stop_copy", 130, equal=False),
        _trial(4096, "recompute", 600), _trial(4096, "live", None, state="aborted"),
    ]
    s = mb.summarize_downtime(trials)
    first, last = s["rows"]
    assert first["length"] == 256 and first["live_ms"] == 12  # median of 10, 12, 50
    assert first["stop_copy_over_live"] == pytest.approx(20 / 12)
    assert last["live_committed"] == 1 and last["live_trials"] == 2
    assert last["stop_copy_over_live"] == pytest.approx(130 / 12)
    assert s["flatness"] == pytest.approx(1.0)
    assert s["goal_flat_met"] is True and s["goal_10x_met"] is True
    assert s["equal"]["stop_copy"] == {"equal": 1, "compared": 2}
    assert s["equal"]["live"] == {"equal": 5, "compared": 5}  # aborted trials are compared too
    text = mb.format_downtime_table(s)
    assert "flatness live(4096)/live(256) = 1.00" in text and "NOT met" not in text
    assert first["live_phases_ms"]["stop"] == 6 and first["live_phases_ms"]["tail"] is None
    phases = mb.format_phase_table(s).splitlines()
    assert phases[0].split()[:3] == ["L", "mode", "stop"] and len(phases) == 2 + 6


def test_downtime_goals_not_met_are_said_so():
    s = mb.summarize_downtime([_trial(256, "live", 50), _trial(256, "stop_copy", 60),
                               _trial(4096, "live", 100, itl=20), _trial(4096, "stop_copy", 300, itl=20)],
                              modes=("live", "stop_copy"))
    assert s["flatness"] == pytest.approx(2.0) and s["goal_flat_met"] is False
    assert s["goal_10x_met"] is False
    assert s["flatness_in_itl"] == pytest.approx((100 / 20) / (50 / 10))
    assert s["recompute_over_live_at_max"] is None
    assert mb.format_downtime_table(s, modes=("live", "stop_copy")).count("NOT met") == 2


def test_downtime_summary_with_no_committed_live_run_has_no_ratio():
    s = mb.summarize_downtime([_trial(256, "live", None, state="aborted"), _trial(256, "stop_copy", 20)])
    assert s["rows"][0]["live_ms"] is None and s["rows"][0]["stop_copy_over_live"] is None
    assert s["goal_10x_met"] is None
    assert "n/a" in mb.format_downtime_table(s)


def _record(index, tpot_s, n=11, served_by=("prefill-0", "decode-0")):
    r = RequestRecord(index, 10, n, status="OK", send_s=0.0)
    r.chunk_times = [0.1 + i * tpot_s for i in range(n)]
    r.chunk_tokens = [1] * n
    r.end_s = r.chunk_times[-1]
    r.output_tokens = n
    r.served_by = list(served_by)
    return r


def test_latency_stats_and_skew_table_ratios():
    off = mb.latency_stats([_record(i, 0.02) for i in range(4)])
    on = mb.latency_stats([_record(0, 0.01, served_by=("prefill-0", "decode-0", "decode-1"))]
                          + [_record(i, 0.01) for i in range(1, 4)])
    assert off["p99_tpot_ms"] == pytest.approx(20.0) and on["p99_tpot_ms"] == pytest.approx(10.0)
    assert on["migrated_requests"] == 1 and off["migrated_requests"] == 0
    table = mb.format_skew_table({"off": off, "on": on})
    assert "(off/on 2.00)" in table
    assert table.splitlines()[0].split()[:3] == ["metric", "off", "on"]


def test_high_priority_indices_spread_over_the_burst():
    assert mb.high_priority_indices(16, 0.25) == {2, 6, 10, 14}
    assert mb.high_priority_indices(8, 0.25) == {2, 6}
    assert mb.high_priority_indices(8, 0.0) == set()


def test_aggregate_skew_pools_bursts_and_splits_priorities():
    from cluster.config import MigrationConfig

    def burst(rep, tpot_s, committed, preemptions):
        return {"repeat": rep, "records": [_record(i, tpot_s) for i in range(4)], "samples": [],
                "migrations_committed": committed, "migrations_aborted": 1, "aborted_by_reason": {"preempted": 1},
                "preemptions": preemptions, "decode0_peak_kv_usage": 0.9 + rep / 100,
                "decode0_kv_usage_at_placement": 0.75, "migration_downtimes_ms": [10.0 * (rep + 1)]}

    priorities = [0, 1, 0, 0]
    run = mb.aggregate_skew("priority", [burst(0, 0.01, 2, 0), burst(1, 0.03, 3, None)], priorities,
                            MigrationConfig(high_priority_headroom_blocks=8), high_indices={1})
    assert run["completed"] == 8 and run["migrations_committed"] == 5
    assert run["aborted_by_reason"] == {"preempted": 2}
    assert run["preemptions"] is None  # one burst could not observe them: no made-up total
    assert run["decode0_peak_kv_usage"] == pytest.approx(0.91)
    assert run["migration_downtime_p50_ms"] == pytest.approx(15.0)
    assert run["high_priority"]["completed"] == 2 and run["normal_priority"]["completed"] == 6
    assert run["migration_config"]["high_priority_headroom_blocks"] == 8
    assert [r["repeat"] for r in run["requests"]] == [0] * 4 + [1] * 4
    assert run["high_priority_positions"]["completed"] == 2
    assert "chunk_times" not in run["requests"][0] and run["requests"][0]["tpot_ms"] is not None
