"""`disagg-serve up` speculation flags and the `spec:` section of the config file -> SpecConfig."""

from __future__ import annotations

import pytest
import yaml

from cluster.config import SpecConfig
from cluster.entrypoints import cli

BASE = ["up", "--model", "/models/m", "--prefill", "1", "--decode", "1"]


def spec(*argv: str) -> SpecConfig:
    return cli.serve_config_from_args(cli.parse_args([*BASE, *argv])).spec


def test_defaults_are_off_with_the_goodput_budget():
    config = spec()
    assert config == SpecConfig() and not config.enabled and config.budget == "goodput"


def test_flags_reach_the_spec_config():
    config = spec("--spec-draft-model", "/models/d", "--spec-k", "2", "--spec-extra", "3",
                  "--spec-budget", "fixed", "--spec-capacity", "12", "--no-tetris", "--tetris-min-batch", "4")
    assert config == SpecConfig(draft_model="/models/d", k=2, extra=3, capacity=12, tetris=False,
                                min_batch_size=4, budget="fixed")


def test_config_file_spec_section_then_flags_win(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"spec": {"spec-draft-model": "/models/d", "spec-k": 4,
                                             "spec-budget": "fixed", "tetris": False}}))
    config = spec("--config", str(path))
    assert (config.draft_model, config.k, config.budget, config.tetris) == ("/models/d", 4, "fixed", False)
    assert spec("--config", str(path), "--spec-budget", "goodput").budget == "goodput"


def test_an_unknown_budget_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        spec("--spec-budget", "sometimes")
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"spec": {"spec-budget": "sometimes"}}))
    with pytest.raises(SystemExit) as exc:
        spec("--config", str(path))
    assert "unknown spec budget 'sometimes'" in str(exc.value)


def test_status_shows_a_speculation_line_per_speculating_instance():
    from cluster.client import status_to_dict
    from cluster.entrypoints.status_format import format_status_table
    from proto import disagg_pb2 as pb

    status = pb.ClusterStatus(model="m")
    status.instances.add(instance_id="prefill-0", role="prefill", state="ready")
    decode = status.instances.add(instance_id="decode-0", role="decode", state="ready")
    s = decode.spec_decode
    s.budget_mode, s.steps, s.steps_without_speculation, s.budget_sum = "goodput", 200, 150, 300
    s.draft_skipped_steps, s.explorations, s.verified, s.accepted = 140, 3, 300, 90
    s.calibration_observations, s.calibration_brier_raw, s.calibration_brier_calibrated = 400, 0.31, 0.18
    s.step_time_samples, s.step_time_predicted_mean_ms, s.step_time_measured_mean_ms = 180, 5.1, 5.3
    lines = [line for line in format_status_table(status_to_dict(status)).splitlines()
             if line.startswith("speculation")]
    assert lines == ["speculation decode-0: budget goodput, 75% of steps without speculation, mean budget "
                     "1.5 drafts/step, draft skipped 140 steps, 3 explorations; acceptance Brier raw 0.310 -> "
                     "calibrated 0.180; step time predicted 5.10 ms vs measured 5.30 ms"]
