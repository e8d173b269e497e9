"""deploy/wait_for_pools.py without a cluster: what it waits for and how it reads the command.
(tests/deploy/test_multinode_ray_start.py runs it against a real `ray start` cluster.)"""

from __future__ import annotations

import pytest

from tests.deploy import support

wait = support.wait_for_pools_module()
UP = ["disagg-serve", "up", "--address", "auto", "--model", "/m", "--prefill", "2", "--decode", "3",
      "--gpus-per-instance", "1", "--cpus-per-instance", "4"]


def test_requirements_cover_every_pool():
    _, command, config = wait.parse_command_line(["--", *UP])
    assert command == UP
    assert wait.requirements(config) == {"disagg_prefill": 2, "disagg_decode": 3, "CPU": 20, "GPU": 5}


def test_custom_pool_resources_and_colocated():
    _, _, config = wait.parse_command_line(
        ["--", *UP, "--prefill-resource", "big_gpu", "--decode-resource", "small_gpu"])
    assert set(wait.requirements(config)) == {"big_gpu", "small_gpu", "CPU", "GPU"}
    _, _, config = wait.parse_command_line(["--", "disagg-serve", "up", "--address", "auto",
                                            "--model", "/m", "--colocated", "2"])
    assert wait.requirements(config) == {"CPU": 2}


def test_reads_the_config_file_like_up(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: /m\npools: {prefill: 1, decode: 4}\n")
    opts, _, config = wait.parse_command_line(
        ["--timeout", "7", "--", "disagg-serve", "up", "--config", str(cfg), "--address", "auto", "--decode", "2"])
    assert opts.timeout == 7
    assert wait.requirements(config)["disagg_decode"] == 2  # the flag wins, as in `up`


def test_python_module_form_is_accepted():
    _, command, _ = wait.parse_command_line(["--", "/usr/bin/python3", "-m", "cluster.entrypoints.cli", *UP[1:]])
    assert command[:3] == ["/usr/bin/python3", "-m", "cluster.entrypoints.cli"]


@pytest.mark.parametrize("argv", [
    ["disagg-serve", "up", "--address", "auto"],                   # no `--`
    ["--", "ray", "start", "--head"],                              # not disagg-serve
    ["--", "disagg-serve", "status"],                              # not `up`
    ["--", "disagg-serve", "up", "--model", "/m", "--colocated", "1"],  # no cluster address
    ["--", "disagg-serve", "up", "--address", "auto", "--model", "/m", "--prefill", "1"],  # no decode pool
])
def test_bad_command_lines_exit(argv):
    with pytest.raises(SystemExit) as exc:
        wait.parse_command_line(argv)
    assert exc.value.code != 0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_waits_until_the_cluster_covers_the_pools():
    clock = FakeClock()
    snapshots = iter([
        RuntimeError("no cluster yet"),
        {"CPU": 8},
        {"CPU": 16, "GPU": 2, "disagg_prefill": 1},
        {"CPU": 24, "GPU": 3, "disagg_prefill": 1, "disagg_decode": 2},
    ])

    def resources():
        snap = next(snapshots)
        if isinstance(snap, Exception):
            raise snap
        return snap

    said = []
    ok = wait.wait_until_covered({"disagg_prefill": 1, "disagg_decode": 2, "GPU": 3}, resources,
                                 timeout_s=100, interval_s=5, say=said.append, clock=clock, sleep=clock.sleep)
    assert ok and clock.now == 15
    assert "not reachable" in said[0] and "disagg_decode 0/2" in said[1]


def test_gives_up_after_the_timeout():
    clock = FakeClock()
    said = []
    ok = wait.wait_until_covered({"disagg_decode": 2}, lambda: {"disagg_decode": 1}, timeout_s=30,
                                 interval_s=5, say=said.append, clock=clock, sleep=clock.sleep)
    assert not ok and clock.now == 30
    assert "gave up" in said[-1] and "disagg_decode 1/2" in said[-1]


def test_one_bundle_per_instance_for_the_autoscaler():
    _, _, config = wait.parse_command_line(["--", *UP])
    bundles = wait.instance_bundles(config)
    assert bundles.count({"disagg_prefill": 1, "CPU": 4, "GPU": 1}) == 2
    assert bundles.count({"disagg_decode": 1, "CPU": 4, "GPU": 1}) == 3
    assert len(bundles) == 5
