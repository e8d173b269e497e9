"""The deployment's options (`--name`, `--frontends`, ...), the `frontend` and `down` commands,
how `up` passes its own options on to the front ends it starts, what a reattaching `up` calls a
mismatch, and the status lines of front ends and the scheduler. No Ray."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.config import DeploymentConfig, EngineConfig, PoolConfig, ServeConfig
from cluster.entrypoints.cli import parse_args, serve_config_from_args
from cluster.entrypoints.deployment import config_differences
from cluster.entrypoints.status_format import format_status_table


def config(*argv: str) -> ServeConfig:
    return serve_config_from_args(parse_args(["up", "--model", "/m", *argv]))


def test_deployment_defaults_and_flags():
    assert config().deployment == DeploymentConfig()
    d = config("--name", "blue", "--frontends", "4", "--load-report-interval", "0.2", "--frontend-heartbeat", "1",
               "--frontend-timeout", "30", "--scheduler-max-restarts", "5").deployment
    assert d == DeploymentConfig(name="blue", frontends=4, load_interval_s=0.2, heartbeat_s=1.0,
                                 frontend_timeout_s=30.0, scheduler_max_restarts=5)


@pytest.mark.parametrize("argv,message", [(["--frontends", "0"], "at least one front end"),
                                          (["--name", "a/b"], "deployment name"),
                                          (["--frontend-heartbeat", "0"], "heartbeat_s")])
def test_bad_deployment_values_exit_with_the_reason(argv, message):
    with pytest.raises(SystemExit, match=message):
        config(*argv)


def test_config_file_deployment_section(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: /m\ndeployment: {name: green, frontends: 2}\n")
    assert config("--config", str(path)).deployment.name == "green"
    assert config("--config", str(path), "--name", "red").deployment == DeploymentConfig(name="red", frontends=2)


def test_up_keeps_its_options_for_the_front_ends_it_starts():
    args = parse_args(["up", "--colocated", "2", "--port", "50051", "--frontends", "3"])
    assert args.argv_rest == ["--colocated", "2", "--port", "50051", "--frontends", "3"]


def test_frontend_takes_ups_options_and_its_own():
    args = parse_args(["frontend", "--address", "10.0.0.1:6379", "--name", "blue", "--port", "50052",
                       "--frontend-id", "fe-x", "--reuse-port", "--http-port", "8000"])
    assert (args.command, args.address, args.name, args.port, args.frontend_id, args.reuse_port, args.http_port) == (
        "frontend", "10.0.0.1:6379", "blue", 50052, "fe-x", True, 8000)


def test_down_names_the_deployment():
    args = parse_args(["down", "--name", "blue"])
    assert (args.command, args.name, args.address) == ("down", "blue", "auto")


def test_config_differences_name_what_does_not_match():
    asked = ServeConfig(engine=EngineConfig(model="/m"), pools=(PoolConfig("decode", 2),))
    running = dataclasses.asdict(asked)
    assert config_differences(running, asked) == []
    # Front-end settings may differ: they are each front end's own.
    assert config_differences(running, asked.replace(deployment=DeploymentConfig(frontends=3))) == []
    other = asked.replace(engine=EngineConfig(model="/other"), pools=(PoolConfig("decode", 3),))
    diffs = config_differences(running, other)
    assert "engine.model: running '/m', asked '/other'" in diffs
    assert any(d.startswith("pools: running") for d in diffs)
    # A config that went through Ray comes back with lists where tuples were: still equal.
    as_lists = {**running, "pools": [dict(p) for p in running["pools"]]}
    assert config_differences(as_lists, asked) == []


def test_status_table_shows_front_ends_and_the_scheduler():
    status = {"instances": [], "deployment": "blue", "frontend_id": "fe-a",
              "scheduler": {"state": "serving", "uptime_s": 61.2, "restarts": 1},
              "frontends": [{"frontend_id": "fe-a", "address": "h:1", "pid": 7, "state": "serving",
                             "requests_in_flight": 3, "requests_total": "40", "uptime_s": 9.0},
                            {"frontend_id": "fe-b", "address": "h:2", "pid": 8, "state": "gone",
                             "requests_in_flight": 0, "requests_total": 5, "uptime_s": 99.0}]}
    text = format_status_table(status)
    assert "deployment blue: scheduler serving, up 61s, 1 restart(s)" in text
    lines = text.splitlines()
    assert any(line.startswith("fe-a *") and "serving" in line and " 3 " in line for line in lines)
    assert any(line.startswith("fe-b") and "gone" in line for line in lines)
