"""`up`'s autoscaler flags and `autoscaler:` YAML section; the `plan` and `profile` commands'
arguments."""

from __future__ import annotations

import pytest
import yaml

from cluster.config import AutoscalerConfig, PoolBounds
from cluster.entrypoints import cli
from router.autoscaler import TableCapacity
from tests.unit.cluster.planner.support import simple_profile

BASE = ["up", "--model", "/models/m", "--prefill", "1", "--decode", "2"]


def autoscaler(*argv: str) -> AutoscalerConfig:
    return cli.serve_config_from_args(cli.parse_args([*BASE, *argv])).autoscaler


def test_default_is_off_and_fixed():
    assert autoscaler() == AutoscalerConfig()


def test_bounds_and_flags():
    cfg = autoscaler("--autoscale", "--decode-min", "1", "--decode-max", "4", "--prefill-max", "2",
                     "--autoscale-cooldown-s", "12", "--autoscale-in-after", "7", "--autoscale-max-waiting", "3")
    assert cfg.enabled
    assert cfg.bounds == (PoolBounds("prefill", 1, 2), PoolBounds("decode", 1, 4))
    assert (cfg.cooldown_s, cfg.scale_in_after, cfg.max_waiting_per_instance) == (12.0, 7, 3.0)


@pytest.mark.parametrize("argv, message", [
    (["--autoscale"], "needs bounds"),
    (["--decode-min", "3"], "outside"),
    (["--decode-max", "1"], "outside"),
    (["--colocated-max", "2"], "no colocated pool"),
    (["--decode-max", "4", "--autoscale-target-utilization", "0.3"], "scale_in_utilization < target"),
    (["--autoscale-profile", "/nonexistent.json", "--decode-max", "3"], "cannot read profile"),
])
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        autoscaler(*argv)
    assert message in str(exc.value)


def test_profile_becomes_a_capacity_table(tmp_path):
    path = simple_profile().save(tmp_path / "p.json")
    cfg = autoscaler("--autoscale", "--decode-max", "3", "--autoscale-profile", str(path),
                     "--autoscale-slo-tpot-ms", "50")
    assert cfg.slo_tpot_ms == 50.0 and cfg.capacity_table
    assert {row[0] for row in cfg.capacity_table} == {"prefill", "decode"}
    assert TableCapacity(cfg.capacity_table).capacity("decode", 200, 50).decode_tokens_per_s > 0


def test_yaml_section(tmp_path, capsys):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": "/models/m", "pools": {"prefill": 1, "decode": 2},
                                    "autoscaler": {"autoscale": True, "decode-min": 1, "decode-max": 3,
                                                   "autoscale-interval-s": 1.5}}))
    cfg = cli.serve_config_from_args(cli.parse_args(["up", "--config", str(path)])).autoscaler
    assert cfg.enabled and cfg.bounds == (PoolBounds("decode", 1, 3),) and cfg.interval_s == 1.5
    path.write_text(yaml.safe_dump({"model": "/models/m", "pools": {"decode": 2, "prefill": 1},
                                    "autoscaler": {"decode-max": "many"}}))
    with pytest.raises(SystemExit):
        cli.serve_config_from_args(cli.parse_args(["up", "--config", str(path)]))
    assert "--decode-max: invalid int value: 'many'" in capsys.readouterr().err


def test_plan_command_writes_a_config_up_accepts(tmp_path, capsys):
    profile = simple_profile(const_s=0.01, per_prompt_token_s=0.001, per_decode_seq_s=0.001).save(tmp_path / "p.json")
    out = tmp_path / "serve.yaml"
    rc = cli.main(["plan", "--profile", str(profile), "--slo-ttft-ms", "500", "--slo-tpot-ms", "40",
                   "--rate", "3", "--input-len", "100", "--output-len", "20", "--max-per-pool", "1",
                   "--max-gpus", "2", "--num-requests", "60", "--out", str(out), "--no-progress",
                   "--model", "/models/m", "--json", str(tmp_path / "plan.json")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "rank" in text and "best:" in text and "accepts it" in text
    doc = yaml.safe_load(out.read_text())
    assert doc["model"] == "/models/m" and set(doc["pools"]) <= {"colocated", "prefill", "decode"}


def test_plan_needs_a_workload():
    with pytest.raises(SystemExit, match="--rate, --input-len and --output-len"):
        cli.main(["plan", "--profile", "synthetic:llama-2-13b@a100-80gb", "--slo-ttft-ms", "1",
                  "--slo-tpot-ms", "1", "--rate", "1"])
