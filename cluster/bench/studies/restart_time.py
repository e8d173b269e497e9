"""From `disagg-serve up` to serving: a cold start (no deployment: scheduler and engines start,
models load) against a restart after `up` was SIGKILLed (the deployment's detached engines
keep running; `up` reattaches), interleaved, on a Ray head this study starts with the real
`ray start` CLI (its own temp dir and ports; stopped at the end by pid, never `ray stop`).
Reports seconds to `READY` per trial, medians and their ratio; JSON + PNG.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results
from cluster.models.demo import demo_target

REPO = Path(__file__).resolve().parents[3]
NAME = "restart-time"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="default: the demo target model")
    p.add_argument("--colocated", type=int, default=1, help="engines in the deployment")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-results")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # A throwaway cluster: no token (see tests/deploy/test_multinode_ray_start.py's node_env).
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")


def _wait_line(proc, text: str, timeout_s: float) -> str | None:
    found: list[str] = []

    def read():
        for line in proc.stdout:
            if text in line:
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return found[0] if found else None


def _up(address: str, args, model: str) -> tuple[subprocess.Popen, float]:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "cluster.entrypoints.cli", "up", "--address", address,
                             "--name", NAME, "--colocated", str(args.colocated), "--model", model,
                             "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-gib", "0.25",
                             "--port", "0", "--host", "127.0.0.1"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    if _wait_line(proc, "READY ", 900) is None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("`up` did not become ready")
    return proc, time.monotonic() - started


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def _down(address: str) -> None:
    subprocess.run([sys.executable, "-m", "cluster.entrypoints.cli", "down", "--address", address, "--name", NAME],
                   cwd=REPO, env=_env(), capture_output=True, timeout=300, check=True)


def main(args) -> int:
    model = args.model or demo_target()
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    port = _free_port()
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--block", "--head", "--port",
                             str(port), "--num-cpus", str(max(2, args.colocated)), "--temp-dir", str(temp),
                             "--include-dashboard", "false", "--dashboard-agent-listen-port", str(_free_port()),
                             "--ray-client-server-port", str(_free_port()), "--object-store-memory", str(256 << 20)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    trials = []
    try:
        if _wait_line(head, "Ray runtime started", 180) is None:
            raise RuntimeError("ray start --head did not start")
        address = f"127.0.0.1:{port}"
        for rep in range(args.repeats):
            _down(address)  # cold: nothing of the deployment runs
            proc, cold = _up(address, args, model)
            _kill(proc)  # `up` dies; the engines stay
            proc, warm = _up(address, args, model)
            _kill(proc)
            trials += [{"repeat": rep, "kind": "cold", "seconds": cold}, {"repeat": rep, "kind": "reattach",
                                                                          "seconds": warm}]
            print(f"[restart-time] repeat {rep}: cold start {cold:.1f}s, reattach {warm:.1f}s", file=sys.stderr,
                  flush=True)
        _down(address)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)
    cold = statistics.median(t["seconds"] for t in trials if t["kind"] == "cold")
    warm = statistics.median(t["seconds"] for t in trials if t["kind"] == "reattach")
    results = {"study": "restart-time", "config": vars(args) | {"model": model}, "trials": trials,
               "median_s": {"cold": cold, "reattach": warm}, "ratio_reattach_over_cold": warm / cold}
    path = write_results(args.out, "restart-time", results)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, kind in enumerate(("cold", "reattach")):
        values = [t["seconds"] for t in trials if t["kind"] == kind]
        ax.bar(i, statistics.median(values), color=["#888", "#3a7"][i])
        ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
    ax.set_xticks([0, 1], ["cold start", "reattach"])
    ax.set_ylabel("seconds from `up` to READY")
    ax.set_title(f"reattach / cold = {warm / cold:.2f}")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"cold start {cold:.1f}s, reattach {warm:.1f}s (median of {args.repeats}); ratio {warm / cold:.3f}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
