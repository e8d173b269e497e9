"""deploy/ray/*.yaml (`ray up` cluster configs): Ray's own schema and config checks, the pools
against the node types, and the serving command on the head."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy import support
from tests.deploy.support import (
    RAY_CLUSTER_YAMLS,
    SERVE_CONFIG,
    parse_serve_command,
    serve_commands,
)

pytestmark = pytest.mark.skipif(not RAY_CLUSTER_YAMLS, reason="no deploy/ray/*.yaml")
IDS = [p.name for p in RAY_CLUSTER_YAMLS]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def remote_to_local(config: dict, remote: str) -> Path:
    """The local file that `file_mounts` ships to `remote` (local paths are relative to the
    repository root, where `ray up` is run)."""
    for target, source in config.get("file_mounts", {}).items():
        prefix = target.rstrip("/") + "/"
        if remote.startswith(prefix):
            return (support.REPO / source / remote[len(prefix):]).resolve()
    raise AssertionError(f"{remote} is not under any file_mounts target")


def head_serving(config: dict):
    cmds = [argv for cmd in config["head_start_ray_commands"] for argv in serve_commands(cmd)]
    assert len(cmds) == 1, f"expected one `disagg-serve up` on the head, found {cmds}"
    (argv,) = cmds
    local = remote_to_local(config, support.option_value(argv, "--config"))
    args, serve = parse_serve_command(argv, local)
    return argv, local, args, serve


@pytest.mark.parametrize("path", RAY_CLUSTER_YAMLS, ids=IDS)
def test_validates_against_the_schema_in_the_ray_package(path):
    schema = json.loads(support.RAY_SCHEMA.read_text())
    jsonschema.validate(load(path), schema)


@pytest.mark.parametrize("path", RAY_CLUSTER_YAMLS, ids=IDS)
def test_ray_up_accepts_it(path):
    """What `ray up` does before it launches anything: merge the provider's defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(path)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_has_teeth():
    schema = json.loads(support.RAY_SCHEMA.read_text())
    bad = copy.deepcopy(load(RAY_CLUSTER_YAMLS[0]))
    bad["available_node_types"]["head"]["resoures"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("path", RAY_CLUSTER_YAMLS, ids=IDS)
def test_head_serves_with_the_shared_config(path):
    config = load(path)
    argv, local, args, _ = head_serving(config)
    assert local == SERVE_CONFIG.resolve()
    assert args.address == "auto"
    assert [a for a in argv[2:] if a.startswith("--")] == ["--config", "--address"]
    # ... behind the wait for the pools, from the synced repository.
    waits = [w for cmd in config["head_start_ray_commands"]
             for w in support.commands_of(cmd, support.is_wait_for_pools)]
    assert len(waits) == 1
    assert remote_to_local(config, waits[0][0]) == (support.DEPLOY / "wait_for_pools.py").resolve()
    assert waits[0][waits[0].index("--") + 1:] == argv
    for cmd in config["worker_start_ray_commands"]:
        assert not serve_commands(cmd), "only the head runs the router"


@pytest.mark.parametrize("path", RAY_CLUSTER_YAMLS, ids=IDS)
def test_node_types_advertise_the_pools(path):
    config = load(path)
    _, _, _, serve = head_serving(config)
    types = config["available_node_types"]
    assert support.pool_fit_problems(serve, types, config["head_node_type"]) == []
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0
    for pool in serve.pools:
        (name,) = [n for n, t in types.items() if t["resources"].get(pool.resource)]
        assert types[name]["resources"].get("GPU", 0) >= 1, f"{name} has no GPU"
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]) \
        <= config["max_workers"]


@pytest.mark.parametrize("path", RAY_CLUSTER_YAMLS, ids=IDS)
def test_setup_installs_the_project_with_the_gpu_extra(path):
    config = load(path)
    installs = [argv for cmd in config["setup_commands"]
                for argv in support.commands_of(cmd, lambda w: w == "pip")]
    targets = [a for argv in installs if argv[1] == "install" for a in argv[2:] if a.endswith("[gpu]")]
    assert len(targets) == 1, installs
    remote = targets[0][: -len("[gpu]")].replace("$HOME", "~")
    assert remote_to_local(config, remote + "/pyproject.toml") == (support.REPO / "pyproject.toml").resolve()
    assert config["docker"]["image"].startswith(f"rayproject/ray:{support.pinned_ray_version()}-")
