"""Wait until the Ray cluster advertises what `disagg-serve up` will ask for, then run it.

    python deploy/wait_for_pools.py [--timeout S] [--interval S] -- disagg-serve up ARGS...

`disagg-serve up --address ...` fails fast when no node advertises a pool's resource yet. On a
cluster that is still coming up (`ray up` starts the head before the GPU workers; KubeRay
starts the head pod next to the worker pods), that would be a crash loop. This wrapper reads
the serving command with the project's own parser (so `--config FILE` and flags mean exactly
what they mean to `up`), asks the autoscaler (where the cluster has one) for a node per engine
instance, waits until the cluster's resources cover every pool (pool resource, CPUs and GPUs
per instance), then replaces itself with the command (exec: same pid, same signals). The
command may also be given as `python -m cluster.entrypoints.cli up ARGS...`.

Exit status: 2 for a bad command line, 1 when the cluster is still short after --timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path


def serve_argv(command: list[str]) -> list[str]:
    """The arguments after the program (`up ...`) of a `disagg-serve up` command line."""
    if command and Path(command[0]).name == "disagg-serve":
        rest = command[1:]
    elif len(command) >= 3 and command[1:3] == ["-m", "cluster.entrypoints.cli"]:
        rest = command[3:]
    else:
        raise ValueError("expected `disagg-serve up ...` or `python -m cluster.entrypoints.cli up ...`, "
                         f"got {command!r}")
    if not rest or rest[0] != "up":
        raise ValueError(f"expected the `up` command, got {command!r}")
    return rest


def requirements(config) -> dict[str, float]:
    """Cluster-wide resources the pools of a ServeConfig ask for."""
    need: dict[str, float] = {}

    def add(name: str, amount: float) -> None:
        if amount > 0:
            need[name] = need.get(name, 0.0) + amount

    for pool in config.pools:
        n = pool.num_instances
        if pool.resource:
            add(pool.resource, n)
        add("CPU", n * pool.num_cpus)
        add("GPU", n * pool.num_gpus)
    return need


def instance_bundles(config) -> list[dict[str, float]]:
    """One resource bundle per engine instance: what each instance's actor asks Ray for."""
    bundles = []
    for pool in config.pools:
        bundle = {name: amount for name, amount in (
            (pool.resource, 1.0), ("CPU", pool.num_cpus), ("GPU", pool.num_gpus)) if name and amount > 0}
        bundles += [dict(bundle) for _ in range(pool.num_instances)]
    return bundles


def shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{resource: (have, need)} for every resource the cluster lacks."""
    return {name: (have.get(name, 0.0), amount) for name, amount in need.items()
            if have.get(name, 0.0) + 1e-9 < amount}


def wait_until_covered(need: dict[str, float], cluster_resources: Callable[[], dict[str, float]],
                       timeout_s: float, interval_s: float, say=print,
                       clock=time.monotonic, sleep=time.sleep) -> bool:
    """Polls `cluster_resources()` until it covers `need`; False after `timeout_s`."""
    deadline = clock() + timeout_s
    started = clock()
    last = None
    while True:
        try:
            missing = shortfall(need, cluster_resources())
        except Exception as exc:  # noqa: BLE001  (cluster not reachable yet: keep waiting)
            missing = {"(ray cluster)": (0.0, 1.0)}
            detail = f"not reachable yet: {type(exc).__name__}: {exc}"
        else:
            detail = ", ".join(f"{name} {have:g}/{amount:g}" for name, (have, amount) in sorted(missing.items()))
        if not missing:
            return True
        if detail != last:
            say(f"[wait-for-pools] waiting for {detail} ({clock() - started:.0f}s)")
            last = detail
        if clock() >= deadline:
            say(f"[wait-for-pools] gave up after {timeout_s:.0f}s: still short of {detail}")
            return False
        sleep(interval_s)


class RayResources:
    """`ray.cluster_resources()` of the cluster at `address`, connecting (again) as needed.
    On connecting it asks the cluster's autoscaler, if there is one, for room for `bundles`
    (a standing request: the autoscaler starts the nodes the pools need, up to its bounds)."""

    def __init__(self, address: str, bundles: list[dict[str, float]] | None = None, say=print):
        self.address = address
        self.bundles = bundles
        self.say = say

    def _connect(self) -> None:
        import ray

        ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
        if self.bundles:
            from ray.autoscaler.sdk import request_resources

            try:
                request_resources(bundles=self.bundles)
            except Exception as exc:  # noqa: BLE001  (a hint to the autoscaler; waiting still works)
                self.say(f"[wait-for-pools] could not ask the autoscaler for the pools: {exc}")

    def __call__(self) -> dict[str, float]:
        import ray

        if not ray.is_initialized():
            self._connect()
        try:
            return dict(ray.cluster_resources())
        except Exception:
            ray.shutdown()
            raise

    def close(self) -> None:
        import ray

        ray.shutdown()


def parse_command_line(argv: list[str]):
    """(options, command, ServeConfig) from `[options] -- disagg-serve up ...`; exits 2 if bad."""
    parser = argparse.ArgumentParser(prog="wait_for_pools.py", usage="%(prog)s [options] -- disagg-serve up ...")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many s")
    parser.add_argument("--interval", type=float, default=5.0, help="poll period, s")
    if "--" not in argv:
        parser.error("give the serving command after `--`")
    split = argv.index("--")
    opts = parser.parse_args(argv[:split])
    command = argv[split + 1:]

    from cluster.entrypoints.cli import parse_args, serve_config_from_args

    try:
        up_argv = serve_argv(command)
    except ValueError as exc:
        parser.error(str(exc))
    args = parse_args(up_argv)
    if not args.model:
        args.model = "(unused here)"  # the wait needs no model; don't build the demo ones
    config = serve_config_from_args(args)
    if not config.address:
        parser.error("the command has no --address: there is no cluster to wait for")
    return opts, command, config


def main(argv: list[str] | None = None) -> int:
    opts, command, config = parse_command_line(list(sys.argv[1:] if argv is None else argv))

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    resources = RayResources(config.address, instance_bundles(config), say=say)
    need = requirements(config)
    say(f"[wait-for-pools] {config.address}: need " + ", ".join(f"{k} {v:g}" for k, v in sorted(need.items())))
    try:
        ok = wait_until_covered(need, resources, opts.timeout, opts.interval, say=say)
    finally:
        resources.close()
    if not ok:
        return 1
    say("[wait-for-pools] cluster ready: " + " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
