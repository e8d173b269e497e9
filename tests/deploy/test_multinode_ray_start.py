"""The manual deployment path on one machine, with the real CLIs: `ray start --head`, then
`ray start --address ... --resources '{"disagg_prefill": 1}'` (and decode) for two more nodes,
then `disagg-serve up --address ...` behind deploy/wait_for_pools.py, as the manifests run it.
The prefill and decode actors must land on the nodes that advertise their pool, and serve.

Teardown stops exactly the processes this test started (each `ray start --block` and
everything below it, by pid), not with `ray stop`: that kills every Ray process on the
machine, other users' clusters included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.deploy.support import DEPLOY, REPO

pytestmark = pytest.mark.integration

RAY_CLI = Path(sys.executable).with_name("ray")
STARTED = "Ray runtime started"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    # A throwaway local cluster: no token. (`ray start --head` turns token auth on when
    # ~/.ray/auth_token exists, and clients given an explicit address would then need
    # RAY_AUTH_MODE=token; keep every process of this test on one explicit setting.)
    env["RAY_AUTH_MODE"] = "disabled"
    return env


class Output:
    """Collects a child's merged output; `wait_for(text)` blocks until a line contains it."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))

    def tail(self, n: int = 60) -> str:
        return "".join(self.lines[-n:])


class Tracked:
    """A child started in its own session; `stop()` ends it and every process below it."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None):
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.out = Output(self.proc.stdout)
        self.seen: dict[int, float] = {}  # pid -> create_time of everything seen below it

    def remember_descendants(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self.seen.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def send(self, sig: int) -> None:
        self.remember_descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 45.0) -> int | None:
        self.send(sig)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever stayed in its session (process group)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        for pid, created in self.seen.items():  # workers that Ray started in sessions of their own
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
            except psutil.Error:
                pass
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        alive = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.Error:
                pass
        return alive


class RayStartCluster:
    """Ray nodes on this machine, each started by the real `ray start --block` CLI."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.nodes: list[Tracked] = []
        self.port = free_port()
        self.address: str | None = None

    def _start(self, args: list[str], timeout_s: float = 120.0) -> Tracked:
        node = Tracked([str(RAY_CLI), "start", "--block", *args,
                        "--dashboard-agent-listen-port", str(free_port()),
                        "--object-store-memory", str(256 << 20)], node_env())
        self.nodes.append(node)
        if node.out.wait_for(STARTED, timeout_s) is None:
            raise RuntimeError(f"`{' '.join(node.argv)}` did not start:\n{node.out.tail()}")
        node.remember_descendants()
        return node

    def start_head(self) -> None:
        self._start(["--head", "--port", str(self.port), "--num-cpus", "1", "--temp-dir", str(self.temp_dir),
                     "--include-dashboard", "false", "--ray-client-server-port", str(free_port())])
        self.address = f"{_node_ip()}:{self.port}"

    def add_node(self, resources: dict[str, float], num_cpus: int = 1) -> None:
        self._start(["--address", self.address, "--num-cpus", str(num_cpus),
                     "--resources", json.dumps(resources)])

    def stop(self) -> list[str]:
        workers, head = self.nodes[1:], self.nodes[:1]
        for node in workers:  # workers first (together), the head (GCS) last
            node.send(signal.SIGTERM)
        for node in [*workers, *head]:
            node.stop()
        return [p for node in self.nodes for p in node.leftovers()]


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


@pytest.fixture(scope="module")
def target_model() -> str:
    from cluster.models.demo import build_demo_models

    return str(build_demo_models() / "target")


@pytest.fixture(scope="module")
def ray_start_cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    cluster = RayStartCluster(temp_dir)
    try:
        cluster.start_head()
        cluster.add_node({"disagg_prefill": 1})
        cluster.add_node({"disagg_decode": 1})
        yield cluster
    finally:
        leftovers = cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, "processes of the test's Ray nodes survived teardown:\n" + "\n".join(leftovers)


def nodes_by_id(address: str, expected: int, timeout_s: float = 60.0) -> dict[str, dict]:
    import ray

    ray.shutdown()  # a connection left by another test would hide ours
    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            if len(alive) >= expected or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)
    finally:
        ray.shutdown()


@pytest.mark.timeout(1200)
def test_pools_land_on_the_nodes_that_advertise_them(ray_start_cluster, target_model):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cluster.client import Client, status_to_dict
    from router.server import SERVICE_NAME

    address = ray_start_cluster.address
    resources = nodes_by_id(address, expected=3)
    assert sorted(r.get("disagg_prefill", 0) + 2 * r.get("disagg_decode", 0) for r in resources.values()) == [0, 1, 2]

    up = [sys.executable, "-m", "cluster.entrypoints.cli", "up", "--address", address,
          "--prefill", "1", "--decode", "1",
          "--model", target_model, "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-gib", "0.25",
          "--port", "0", "--host", "127.0.0.1"]
    server = Tracked([sys.executable, str(DEPLOY / "wait_for_pools.py"), "--timeout", "120", "--interval", "1",
                      "--", *up], node_env(), cwd=REPO)
    try:
        ready = server.out.wait_for("READY ", 600)
        assert ready is not None, "server did not become ready:\n" + server.out.tail()
        assert server.out.wait_for("[wait-for-pools] cluster ready", 0) is not None
        assert server.out.wait_for("could not ask the autoscaler", 0) is None, server.out.tail()
        port = int(ready.split()[1])
        server.remember_descendants()

        with Client(f"127.0.0.1:{port}", timeout=300) as client:
            # What the Kubernetes probes ask.
            health = health_pb2_grpc.HealthStub(client.channel)
            for name in ("", SERVICE_NAME):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, name

            instances = status_to_dict(client.cluster_status())["instances"]
            placed = {i["role"]: i["node_id"] for i in instances}
            assert set(placed) == {"prefill", "decode"}, instances
            assert resources[placed["prefill"]].get("disagg_prefill") == 1
            assert "disagg_decode" not in resources[placed["prefill"]]
            assert resources[placed["decode"]].get("disagg_decode") == 1
            assert "disagg_prefill" not in resources[placed["decode"]]

            done = client.generate("def fibonacci(n):", max_tokens=16, temperature=0.0)
            assert done.finish_reason in ("length", "stop") and done.completion_tokens > 0
            assert len(done.token_ids) == done.completion_tokens
            assert done.served_by == ["prefill-0", "decode-0"]

        rc = server.stop(signal.SIGINT, grace_s=60)
        assert rc == 0, "server did not shut down cleanly:\n" + server.out.tail()
    finally:
        server.stop(signal.SIGKILL, grace_s=5)
        assert not server.leftovers(), server.leftovers()
