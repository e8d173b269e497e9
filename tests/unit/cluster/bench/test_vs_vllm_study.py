"""The vs-vllm study's table (cluster/bench/studies/vs_vllm.py): medians over turns, ratios to
vLLM's server and the goal checks, on fake results of vLLM's benchmark module."""

from __future__ import annotations

import pytest

from cluster.bench.studies.vs_vllm import aggregate, format_report, goals


def turn(tok_s: float, ttft: float, tpot: float, failed: int = 0, rate: str = "inf") -> dict:
    return {"runs": {rate: {"output_throughput": tok_s, "median_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft,
                            "median_tpot_ms": tpot, "p99_tpot_ms": 2 * tpot, "median_itl_ms": tpot,
                            "completed": 10 - failed, "failed": failed}}}


def test_ratios_use_medians_over_turns_and_goals_follow_the_direction_of_each_metric():
    turns = {"vllm": [turn(1000, 100, 10), turn(2000, 300, 30), turn(1500, 200, 20)],
             "colocated-1": [turn(1600, 215, 19), turn(1600, 215, 25, failed=1), turn(1400, 230, 21)]}
    table = aggregate(turns, ["inf"])
    ours = table["colocated-1"]["inf"]
    assert ours["output_throughput"] == 1600 and table["vllm"]["inf"]["output_throughput"] == 1500
    assert ours["ratio"]["output_throughput"] == pytest.approx(1600 / 1500)
    assert ours["ratio"]["median_ttft_ms"] == pytest.approx(215 / 200)
    assert ours["ratio"]["median_tpot_ms"] == pytest.approx(21 / 20)
    assert ours["failed"] == 1 and ours["completed"] == 29
    assert goals(table) == {"inf": {"output_throughput": True, "median_ttft_ms": True, "median_tpot_ms": True}}
    assert "(1.07x)" in format_report(table, ["inf"])


def test_a_missed_goal_is_reported_missed():
    table = aggregate({"vllm": [turn(1000, 100, 10)], "colocated-1": [turn(990, 120, 10)]}, ["inf"])
    assert goals(table) == {"inf": {"output_throughput": False, "median_ttft_ms": False, "median_tpot_ms": True}}


def test_without_vllm_there_are_no_ratios_nor_goals():
    table = aggregate({"colocated-1": [turn(990, 120, 10)]}, ["inf"])
    assert "ratio" not in table["colocated-1"]["inf"] and goals(table) == {}
