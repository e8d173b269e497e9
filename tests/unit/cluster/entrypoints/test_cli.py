"""`disagg-serve up` migration flags and `--config` sections; the migrate / drain commands and
the migration lines of `status`."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import yaml

from cluster.client import status_to_dict
from cluster.config import MigrationConfig
from cluster.entrypoints import cli
from proto import disagg_pb2 as pb
from tests import REPO

SERVE_YAML = REPO / "deploy" / "config" / "serve.yaml"
BASE = ["up", "--model", "/models/m", "--prefill", "1", "--decode", "2"]


def migration(*argv: str) -> MigrationConfig:
    return cli.serve_config_from_args(cli.parse_args([*BASE, *argv])).migration


def write(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# --- up flags -----------------------------------------------------------------------------

def test_defaults_are_migration_configs():
    assert migration() == MigrationConfig()


@pytest.mark.parametrize("flag, value, field, expected", [
    ("--migration-interval-s", "0.25", "interval_s", 0.25),
    ("--migrate-out-threshold", "1.5", "migrate_out_threshold", 1.5),
    ("--migrate-in-threshold", "12", "migrate_in_threshold", 12.0),
    ("--migration-max-pairs", "2", "max_pairs_per_round", 2),
    ("--migration-selection", "longest", "selection", "longest"),
    ("--priority-headroom-blocks", "16", "high_priority_headroom_blocks", 16),
    ("--high-priority-threshold", "5", "high_priority_threshold", 5),
    ("--migration-stop-copy-blocks", "3", "stop_copy_blocks", 3),
    ("--migration-max-stages", "8", "max_stages", 8),
    ("--migration-timeout-s", "12.5", "timeout_s", 12.5),
    ("--migration-reservation-timeout-s", "90", "reservation_timeout_s", 90.0),
    ("--migration-reserve-watermark-blocks", "4", "reserve_watermark_blocks", 4),
    ("--drain-timeout-s", "45", "drain_timeout_s", 45.0),
])
def test_each_flag_sets_its_field(flag, value, field, expected):
    config = migration(flag, value)
    assert getattr(config, field) == expected and type(getattr(config, field)) is type(expected)


def test_every_config_field_has_a_flag():
    flagged = {name for _, name, _, _ in cli._MIGRATION_FLAGS} | {"enabled", "selection"}
    assert flagged == set(MigrationConfig.__dataclass_fields__)


def test_migration_on_and_off():
    assert migration("--no-migration").enabled is False
    assert migration("--migration").enabled is True


@pytest.mark.parametrize("argv, message", [
    (["--migration-max-stages", "0"], "max_stages"),
    (["--migration-timeout-s", "0"], "timeout_s must be a finite number > 0"),
    (["--migrate-out-threshold", "9", "--migrate-in-threshold", "4"], "migrate_in_threshold"),
    (["--priority-headroom-blocks", "-1"], "headroom"),
    (["--drain-timeout-s", "0"], "--drain-timeout-s"),
])
def test_out_of_range_values_exit_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        migration(*argv)
    assert message in str(exc.value)


def test_argparse_checks_selection_and_types():
    for argv in (["--migration-selection", "random"], ["--migration-max-pairs", "two"]):
        with pytest.raises(SystemExit):
            cli.parse_args([*BASE, *argv])


# --- --config -----------------------------------------------------------------------------

def test_config_file_section_then_flags_win(tmp_path):
    path = write(tmp_path, {"migration": {
        "migration": False, "migration-interval-s": 2, "migrate-out-threshold": 1,
        "migration-selection": "shortest", "migration_max_stages": 6, "drain-timeout-s": 10}})
    config = migration("--config", path)
    assert (config.enabled, config.interval_s, config.migrate_out_threshold, config.selection,
            config.max_stages, config.drain_timeout_s) == (False, 2.0, 1.0, "shortest", 6, 10.0)
    assert type(config.interval_s) is float  # a YAML int becomes the flag's type
    flags = migration("--config", path, "--migration", "--migration-max-stages", "2",
                      "--migration-selection", "last")
    assert (flags.enabled, flags.max_stages, flags.selection, flags.interval_s) == (True, 2, "last", 2.0)


def test_config_file_top_level_keys_work_too(tmp_path):
    path = write(tmp_path, {"migration": False, "migration-timeout-s": 5})
    config = migration("--config", path)
    assert config.enabled is False and config.timeout_s == 5.0


@pytest.mark.parametrize("section, message", [
    ({"migration-selection": "random"}, "selection"),
    ({"migration-max-stages": 2.5}, "--migration-max-stages must be an integer"),
    ({"migration-timeout-s": [30]}, "--migration-timeout-s must be a number"),
    ({"migration-max-pairs": True}, "--migration-max-pairs must be an integer"),
    ({"migration": "sometimes"}, "migration must be true or false"),
])
def test_bad_config_values_exit_with_the_reason(tmp_path, section, message):
    path = write(tmp_path, {"migration": section})
    with pytest.raises(SystemExit) as exc:
        migration("--config", path)
    assert message in str(exc.value)


def test_a_bad_string_in_the_config_file_fails_like_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse converts string defaults with the flag's type
        migration("--config", write(tmp_path, {"migration": {"migration-timeout-s": "soon"}}))
    assert "invalid float value: 'soon'" in capsys.readouterr().err


def test_unknown_key_in_the_migration_section_is_an_error(tmp_path, capsys):
    path = write(tmp_path, {"migration": {"migration-speed": 3}})
    with pytest.raises(SystemExit):
        cli.parse_args([*BASE, "--config", path])
    assert "unknown option 'migration-speed'" in capsys.readouterr().err


def test_deploy_serve_yaml_lists_every_migration_option():
    section = yaml.safe_load(SERVE_YAML.read_text())["migration"]
    up = cli._subparser(cli.build_parser(), "up")
    group = next(g for g in up._action_groups if g.title == "live migration (decode pool)")
    assert {key.replace("-", "_") for key in section} == {a.dest for a in group._group_actions}
    assert migration("--config", str(SERVE_YAML)) == MigrationConfig()


# --- migrate / drain commands ---------------------------------------------------------------

class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


MIGRATION = {"migration_id": "mig-1", "request_id": "req-1", "source": "decode-0", "target": "decode-1",
             "state": "committed", "reason": "", "trigger": "admin", "stages": 3, "blocks_copied": 12,
             "tokens_moved": 200, "downtime_s": 0.0042, "duration_s": 0.31}


class FakeClient:
    def __init__(self, result=None, error=None):
        self.result, self.error, self.calls = result, error, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def _answer(self, *call):
        self.calls.append(call)
        if self.error:
            raise self.error
        return self.result

    def migrate(self, request_id, target=None):
        return self._answer("migrate", request_id, target)

    def drain(self, instance_id, timeout_s=None, cancel=False):
        return self._answer("drain", instance_id, timeout_s, cancel)


def run(monkeypatch, argv, client: FakeClient) -> int:
    seen = {}

    def make(args):
        seen.update(server=args.server, token=args.auth_token, ca=args.tls_ca)
        return client

    monkeypatch.setattr(cli, "_client", make)
    code = cli.main(argv)
    client.seen = seen
    return code


def test_migrate_prints_a_summary(monkeypatch, capsys):
    client = FakeClient(MIGRATION)
    code = run(monkeypatch, ["migrate", "req-1", "--to", "decode-1", "--server", "h:1", "--auth-token", "t",
                             "--tls-ca", "ca.pem"], client)
    out = capsys.readouterr().out
    assert code == 0 and client.calls == [("migrate", "req-1", "decode-1")]
    assert client.seen == {"server": "h:1", "token": "t", "ca": "ca.pem"}
    assert out.count("\n") == 1
    assert "migrated req-1: decode-0 -> decode-1" in out and "downtime 4.2 ms" in out and "12 blocks" in out


def test_migrate_without_target_and_json(monkeypatch, capsys):
    client = FakeClient(MIGRATION)
    assert run(monkeypatch, ["migrate", "req-1", "--json"], client) == 0
    assert client.calls == [("migrate", "req-1", None)]
    assert json.loads(capsys.readouterr().out) == MIGRATION


def test_an_aborted_migration_exits_1_with_its_reason(monkeypatch, capsys):
    aborted = MIGRATION | {"state": "aborted", "reason": "timeout: stage 4", "downtime_s": None}
    assert run(monkeypatch, ["migrate", "req-1"], FakeClient(aborted)) == 1
    out = capsys.readouterr().out
    assert "migration of req-1 aborted" in out and "timeout: stage 4" in out


def test_migrate_rpc_error_exits_1(monkeypatch, capsys):
    error = FakeRpcError(grpc.StatusCode.NOT_FOUND, "no request req-1")
    assert run(monkeypatch, ["migrate", "req-1"], FakeClient(error=error)) == 1
    assert "error: NOT_FOUND: no request req-1" in capsys.readouterr().err


def test_drain(monkeypatch, capsys):
    client = FakeClient({"instance_id": "decode-0", "migrated": 3, "remaining": 0, "failed": 1,
                         "migrations": []})
    assert run(monkeypatch, ["drain", "decode-0", "--timeout", "20"], client) == 0
    assert client.calls == [("drain", "decode-0", 20.0, False)]
    assert capsys.readouterr().out == "drained decode-0: 3 migrated, 1 failed, 0 remaining\n"


def test_incomplete_drain_exits_1(monkeypatch, capsys):
    client = FakeClient({"instance_id": "decode-0", "migrated": 1, "remaining": 2, "failed": 0,
                         "migrations": []})
    assert run(monkeypatch, ["drain", "decode-0"], client) == 1
    assert client.calls == [("drain", "decode-0", None, False)]
    out = capsys.readouterr().out
    assert "incomplete" in out and "2 remaining" in out and "--cancel" in out


def test_drain_cancel(monkeypatch, capsys):
    client = FakeClient({"instance_id": "decode-0", "migrated": 0, "remaining": 0, "failed": 0,
                         "migrations": []})
    assert run(monkeypatch, ["drain", "decode-0", "--cancel"], client) == 0
    assert client.calls == [("drain", "decode-0", None, True)]
    assert "decode-0 undrained" in capsys.readouterr().out


def test_drain_rpc_error_exits_1(monkeypatch, capsys):
    error = FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "decode-0 is not draining")
    assert run(monkeypatch, ["drain", "decode-0", "--cancel"], FakeClient(error=error)) == 1
    assert "FAILED_PRECONDITION: decode-0 is not draining" in capsys.readouterr().err


# --- status ---------------------------------------------------------------------------------

def test_status_table_shows_migrations():
    status = pb.ClusterStatus(model="m", mode="disaggregated")
    s = status.migrations
    s.started, s.committed, s.aborted, s.blocks_copied = 7, 5, 1, 40
    s.aborted_by_reason["timeout"] = 1
    s.downtime_p50_s, s.downtime_p99_s, s.downtime_max_s = 0.0031, 0.0095, 0.012
    s.in_flight.add(request_id="req-4", source="decode-0", target="decode-1", state="precopy",
                    trigger="balance", stages=2, blocks_copied=6, duration_s=0.4)
    table = cli.format_status_table(status_to_dict(status))  # int64 fields arrive as JSON strings
    lines = table.splitlines()
    assert lines[-2] == ("migrations: 7 started, 5 committed, 1 aborted (timeout 1)  "
                         "downtime p50/p99/max: 3.1/9.5/12.0 ms")
    assert lines[-1] == "  migrating req-4: decode-0 -> decode-1 (precopy, balance, stage 2, 6 blocks, 0.4s)"


def test_status_table_of_a_server_without_migrations():
    table = cli.format_status_table({"model": "m", "instances": []})
    assert "migrations" not in table
