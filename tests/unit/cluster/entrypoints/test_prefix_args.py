"""`up`'s prefix-reuse flags and config-file section, and how `status` shows prefix reuse."""

from __future__ import annotations

import pytest
import yaml

from cluster.client import status_to_dict
from cluster.config import PoolConfig, PrefixRoutingConfig
from cluster.entrypoints import cli
from cluster.entrypoints.deployment import engine_config_for
from proto import disagg_pb2 as pb

BASE = ["up", "--model", "/models/m", "--prefill", "2", "--decode", "1"]


def config(*argv: str):
    return cli.serve_config_from_args(cli.parse_args([*BASE, *argv]))


def test_defaults_cache_on_prompt_pools_only():
    cfg = config()
    assert cfg.engine.enable_prefix_caching and cfg.prefix_routing == PrefixRoutingConfig()
    assert engine_config_for(cfg.engine, PoolConfig("prefill", 2)).enable_prefix_caching
    assert engine_config_for(cfg.engine, PoolConfig("colocated", 1)).enable_prefix_caching
    # Live migration needs it off on decode instances, whatever the config says.
    assert not engine_config_for(cfg.engine, PoolConfig("decode", 1)).enable_prefix_caching


def test_flags_and_layerwise_push():
    cfg = config("--prefix-routing", "load", "--session-slack-tokens", "64", "--colocated-request-cost-tokens", "0")
    assert cfg.prefix_routing == PrefixRoutingConfig(policy="load", session_slack_tokens=64,
                                                     colocated_request_cost_tokens=0)
    assert not config("--no-prefix-caching").engine.enable_prefix_caching
    # Layer-wise push sends only computed blocks: a prefix hit's blocks would never arrive.
    assert not config("--kv-push", "layerwise").engine.enable_prefix_caching


def test_config_file_section(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": "/models/m", "pools": {"prefill": 1, "decode": 1},
                                    "prefix": {"prefix-routing": "load", "session-slack-tokens": 10}}))
    cfg = cli.serve_config_from_args(cli.parse_args(["up", "--config", str(path)]))
    assert cfg.prefix_routing.policy == "load" and cfg.prefix_routing.session_slack_tokens == 10


def test_bad_values_exit_with_the_reason():
    with pytest.raises(SystemExit) as exit_info:
        config("--session-slack-tokens", "-1")
    assert "session_slack_tokens >= 0" in str(exit_info.value)
    with pytest.raises(ValueError):
        PrefixRoutingConfig(policy="random")


def test_status_table_shows_hit_rates_and_routing():
    status = pb.ClusterStatus(model="m", mode="disaggregated")
    entry = status.instances.add(instance_id="prefill-0", role="prefill", state="ready")
    entry.prefix_cache.CopyFrom(pb.PrefixCacheStats(query_tokens=1000, hit_tokens_device=600, hit_rate=0.6,
                                                    cached_blocks=40))
    status.instances.add(instance_id="decode-0", role="decode", state="ready")
    status.routing.policy = "prefix"
    status.routing.sessions = 3
    status.routing.decisions["prefill/session"] = 9
    status.routing.decisions["prefill/load"] = 3
    lines = cli.format_status_table(status_to_dict(status)).splitlines()
    assert ("prefix cache prefill-0: 60.0% of 1000 prompt tokens served from the device cache, "
            "40 blocks cached") in lines
    assert "routing (prefix): prefill/load 3, prefill/session 9; 3 session(s)" in lines
