"""Starts serving: Ray, the deployment (its global scheduler and engines: new, or the running
ones of the same name), and its front ends with their gRPC, HTTP and metrics ports.

`up` without `--address` starts a local Ray instance and stops everything when it exits, as
before. With `--address` the deployment's actors are detached: `up` exiting (or dying) stops
only its front ends; the next `up` reattaches to the running engines (cluster/entrypoints/
deployment.py), and `disagg-serve down` stops the deployment for good.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import ray

from cluster.config import PoolConfig, ServeConfig
from cluster.engine.parallelism import ParallelismError, check_pools
from cluster.entrypoints import deployment as dep
from cluster.entrypoints.frontend_process import (
    RunningFrontEnd,
    load_tokenizer,
    new_frontend_id,
    say,
    start_frontend,
)

log = logging.getLogger(__name__)


def init_ray(config: ServeConfig) -> None:
    if ray.is_initialized():
        return
    namespace = config.deployment.name
    if config.address:
        ray.init(address=config.address, namespace=namespace, log_to_driver=config.worker_logs_to_driver)
        check_pool_resources(config)
        return
    needed = sum(p.cpus_per_instance * _local_instances(config, p) for p in config.pools)
    # A local Ray instance is one node serving every pool: it advertises all pool resources, up
    # to each pool's autoscaling maximum so a scale-out finds room.
    resources = {p.resource: _local_instances(config, p) for p in config.pools
                 if p.resource and _local_instances(config, p)}
    for attempt in (1, 2, 3):
        try:
            ray.init(num_cpus=config.local_num_cpus or max(2, needed), resources=resources,
                     include_dashboard=False, log_to_driver=config.worker_logs_to_driver, namespace=namespace)
            return
        except Exception as exc:  # e.g. "node timed out during startup" on a loaded machine
            if attempt == 3:
                raise
            say(f"starting Ray failed ({exc}); retrying")
            ray.shutdown()
            time.sleep(2.0 * attempt)


def _local_instances(config: ServeConfig, pool: PoolConfig) -> int:
    """How many instances of `pool` a local node must have room for."""
    bounds = config.autoscaler.bounds_for(pool.role) if config.autoscaler.enabled else None
    return max(pool.num_instances, bounds.max_instances if bounds else 0)


def check_pool_resources(config: ServeConfig) -> None:
    """On a real cluster, fail fast (not hang) when no node advertises a pool's resource."""
    available = ray.cluster_resources()
    for pool in config.pools:
        if not pool.resource or pool.num_instances == 0:
            continue
        have = available.get(pool.resource, 0)
        if have < pool.num_instances:
            raise RuntimeError(
                f"the {pool.role} pool needs {pool.num_instances} x resource {pool.resource!r}, but the Ray "
                f"cluster advertises {have:g}; start its nodes with "
                f"ray start --resources='{{\"{pool.resource}\": N}}'")


@dataclass
class RunningCluster:
    """A deployment served by one front end in this process (`up`, the demo, the studies)."""

    config: ServeConfig
    scheduler: object  # the global scheduler's actor handle
    running: RunningFrontEnd
    attached: bool  # the deployment was running already (reattached, engines kept)
    owns_deployment: bool  # stop() stops the engines too (a local `up`, a study)
    started_s: float = 0.0  # from start_cluster's call to serving
    children: list = field(default_factory=list)  # more front ends, as processes

    @property
    def frontend(self):
        return self.running.frontend

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace_s: float = 5.0) -> None:
        began = time.monotonic()
        stop_children(self.children)
        await self.running.stop(grace_s)
        say(f"front ends stopped ({time.monotonic() - began:.1f}s)")
        if self.owns_deployment:
            began = time.monotonic()
            stopped = await asyncio.to_thread(dep.shutdown, self.config.deployment.name)
            say(f"stopped {', '.join(stopped)} ({time.monotonic() - began:.1f}s)")


async def start_cluster(config: ServeConfig, owns_deployment: bool | None = None) -> RunningCluster:
    """Starts (or reattaches to) the deployment, waits for its engines, starts a front end.
    `owns_deployment` (default: no --address) makes stop() stop the engines. Call in an event loop."""
    started = time.monotonic()
    check_pools(config)  # a TP degree that cannot fit the model fails here, before anything starts
    # The tokenizer loads (transformers' import takes seconds) while Ray connects and engines start.
    tokenizer = asyncio.ensure_future(asyncio.to_thread(load_tokenizer, config))
    init_ray(config)
    scheduler, attached = await asyncio.to_thread(dep.create_or_attach, config)
    name = config.deployment.name
    if attached:
        say(f"reattaching to deployment {name!r}")
    else:
        n = sum(p.num_instances for p in config.pools)
        say(f"deployment {name!r}: starting the scheduler and {n} engine instance(s)")
    await asyncio.to_thread(dep.wait_until_ready, scheduler, config.router.startup_timeout_s, say)
    owns = owns_deployment if owns_deployment is not None else config.address is None
    try:
        await asyncio.to_thread(dep.check_kv_layouts, name)
    except ParallelismError:
        if owns and not attached:
            await asyncio.to_thread(dep.shutdown, name)
        raise
    running = await start_frontend(config, scheduler, frontend_id=new_frontend_id(),
                                   reuse_port=config.deployment.frontends > 1 and config.router.port != 0,
                                   tokenizer=await tokenizer)
    return RunningCluster(config, scheduler, running, attached, owns, time.monotonic() - started)


def start_more_frontends(config: ServeConfig, argv: list[str], count: int) -> list:
    """`count` more front ends as `disagg-serve frontend` processes on this node, sharing the
    gRPC port (SO_REUSEPORT) when it is fixed, each on its own when it is 0; their HTTP and
    metrics ports follow the given ones. They die with this process. Returns
    [(frontend id, process, port)] once each serves."""
    address = ray.get_runtime_context().gcs_address
    rc = config.router
    children = []
    for i in range(1, count + 1):
        fid = f"{new_frontend_id()}-{i}"
        extra = ["--address", address, "--name", config.deployment.name, "--frontend-id", fid]
        if rc.port != 0:
            extra += ["--reuse-port"]
        # Port 0: every front end picks its own ports; fixed ports: the next ones up.
        if rc.metrics_port is not None:
            extra += ["--metrics-port", str(rc.metrics_port + i if rc.port and rc.metrics_port else 0)]
        if rc.http_port is not None:
            extra += ["--http-port", str(rc.http_port + i if rc.port and rc.http_port else 0)]
        cmd = [sys.executable, "-m", "cluster.entrypoints.cli", "frontend", *argv, *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        children.append((fid, proc))
    out = []
    for fid, proc in children:
        port = wait_ready_line(proc, rc.startup_timeout_s)
        if port is None:
            stop_children([(f, p, 0) for f, p in children])
            raise RuntimeError(f"front end {fid} did not start (exit code {proc.poll()})")
        out.append((fid, proc, port))
    return out


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies (Linux), so a killed `up` leaves no front end."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_ready_line(proc, timeout_s: float) -> int | None:
    """The port of a serving child's `READY <port>` line on its stdout (None: not within
    `timeout_s`, or it exited first)."""
    found: list[int] = []

    def read():
        for line in proc.stdout:
            if line.startswith("READY "):
                found.append(int(line.split()[1]))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return found[0] if found else None


def stop_children(children: list, timeout_s: float = 30.0) -> None:
    for _, proc, _ in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for _, proc, _ in children:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


async def serve_until_signal(config: ServeConfig, frontend_argv: list[str] | None = None) -> None:
    """`disagg-serve up`: prints `READY <port>` (and `FRONTEND <id> <port> <pid>` per front end)
    once everything serves; SIGINT/SIGTERM stops the front ends, and the deployment too when
    this process started the Ray instance."""
    try:
        cluster = await start_cluster(config)
    except (dep.DeploymentMismatch, ParallelismError) as exc:
        say(f"error: {exc}")
        raise SystemExit(2) from exc
    if config.deployment.frontends > 1:
        cluster.children = await asyncio.to_thread(
            start_more_frontends, config, frontend_argv or [], config.deployment.frontends - 1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"FRONTEND {cluster.frontend.frontend_id} {cluster.port} {cluster.frontend.info['pid']}", flush=True)
    # The bound ports (port 0 asks for free ones: scripts and tests read them here).
    if cluster.running.http_port is not None:
        print(f"HTTP {cluster.running.http_port}", flush=True)
    if cluster.running.metrics_port is not None:
        print(f"METRICS {cluster.running.metrics_port}", flush=True)
    for fid, proc, port in cluster.children:
        print(f"FRONTEND {fid} {port} {proc.pid}", flush=True)
    say(f"deployment {config.deployment.name!r} serving ({'reattached' if cluster.attached else 'started'} "
        f"in {cluster.started_s:.1f}s)")
    print(f"READY {cluster.port}", flush=True)
    await stop.wait()
    say("shutting down")
    await cluster.stop()
    if not cluster.owns_deployment:
        say(f"deployment {config.deployment.name!r} keeps running; `disagg-serve down --name "
            f"{config.deployment.name} --address ...` stops it")
    began = time.monotonic()
    ray.shutdown()
    say(f"stopped (Ray shut down in {time.monotonic() - began:.1f}s)")


def down(address: str, name: str) -> list[str]:
    """`disagg-serve down`: stops the deployment `name` on the Ray cluster at `address`."""
    ray.init(address=address, namespace=name, log_to_driver=False)
    try:
        return dep.shutdown(name)
    finally:
        ray.shutdown()
