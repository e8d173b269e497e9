"""How many streamed tokens a front end carries per CPU-second, without vLLM: simulated engine
actors (cluster/bench/sim_engine.py) give every live request a token every `--step-ms`, a real
global scheduler places requests, and real front-end processes (`disagg-serve frontend`) stream
them over gRPC to a closed-loop load generator in its own process (cluster/bench/load_client.py).

Compared in the same run, interleaved: the pre-split Router of an earlier revision (one
process: table, pump, detokenizer, gRPC; cluster/bench/head_router_driver.py) and one new front
end, at each batch (concurrent streams); then 1, 2 and 4 front ends at the largest batch.
Reported per round: tokens/s received, the serving processes' CPU-seconds (psutil), tokens per
CPU-second and CPU-seconds per 1k tokens, client messages per token. With `--profile` a py-spy
profile of one front end is summarized (where its time goes).

Every process shares this machine's cores: on 2 cores, extra front ends compete with the load
generator and the simulated engines, so the 1/2/4 sweep shows CPU per token, not scale-out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray

from cluster.bench.plots import pyplot
from cluster.bench.sim_spawner import SimSpawner
from cluster.bench.studies.common import write_results
from cluster.config import (
    DeploymentConfig,
    EngineConfig,
    MigrationConfig,
    PoolConfig,
    RouterConfig,
    ServeConfig,
)
from cluster.entrypoints.deployment import SCHEDULER_NAME, wait_until_ready
from cluster.entrypoints.launcher import wait_ready_line
from cluster.models.demo import demo_target
from cluster.models.tokenizer import load_serving_tokenizer
from router.scheduler import GlobalScheduler, MemoryStore

REPO = Path(__file__).resolve().parents[3]
NAMESPACE = "frontend-capacity"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="tokenizer directory (default: the demo target model)")
    p.add_argument("--engines", type=int, default=4, help="simulated engine actors")
    p.add_argument("--step-ms", type=float, default=25.0, help="one token per live request every step")
    p.add_argument("--batches", default="64,256,1024", help="concurrent streams per round")
    p.add_argument("--frontends", default="1,2,4", help="front-end counts, at the largest batch")
    p.add_argument("--stream-intervals-ms", default="25",
                   help="also run one front end with each of these --stream-interval-ms (fewer messages)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--baseline-rev", default="auto",
                   help="git revision with the pre-split router/router.py ('auto': the newest one; "
                        "'none': no baseline)")
    p.add_argument("--profile", action="store_true", help="py-spy one front end during a round")
    p.add_argument("--quick", action="store_true", help="batches 64,256; front ends 1,2; 5 s rounds")
    p.add_argument("--out", default="bench-results")


class Served:
    """A serving process (front end or baseline router) and its gRPC port."""

    def __init__(self, name: str, argv: list[str], cwd: Path = REPO, env=None):
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=env)
        self.port = wait_ready_line(self.proc, 300.0)
        if self.port is None:
            raise RuntimeError(f"{name} did not start (exit {self.proc.poll()})")
        self.ps = psutil.Process(self.proc.pid)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def system_s(self) -> float:
        return self.ps.cpu_times().system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _round(label: str, served: list[Served], batch: int, args, profile_to: Path | None = None) -> dict:
    """One closed-loop round against `served`; CPU measured over the client's window."""
    addresses = ",".join(s.address for s in served)
    client = subprocess.Popen([sys.executable, "-m", "cluster.bench.load_client", "--addresses", addresses,
                               "--concurrency", str(batch), "--max-tokens", str(args.max_tokens),
                               "--duration", str(args.duration), "--warmup", str(args.warmup)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    time.sleep(args.warmup)
    cpu0 = [s.cpu_s() for s in served]
    sys0 = [s.system_s() for s in served]
    spy = None
    py_spy = profile_to is not None and shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if py_spy:
        spy = subprocess.Popen([py_spy, "record", "--format", "raw", "-o", str(profile_to), "-r", "200",
                                "-d", str(int(args.duration)), "-p", str(served[0].proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(args.duration)
    cpu = [s.cpu_s() - c for s, c in zip(served, cpu0, strict=True)]
    system = sum(s.system_s() - c for s, c in zip(served, sys0, strict=True))
    out, _ = client.communicate(timeout=120)
    if spy is not None:
        spy.wait(60)
    result = json.loads(out.strip().splitlines()[-1])
    tokens, seconds = result["tokens"], result["seconds"]
    total_cpu = sum(cpu)
    row = {"label": label, "batch": batch, "frontends": len(served), "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds if seconds else 0.0, "serving_cpu_s": total_cpu,
           "cpu_s_per_process": cpu, "system_cpu_s": system,
           "tokens_per_cpu_s": tokens / total_cpu if total_cpu else 0.0,
           "cpu_s_per_1k_tokens": 1000 * total_cpu / tokens if tokens else None,
           "messages_per_token": result["messages"] / tokens if tokens else None,
           "client_cpu_s": result["client_cpu_s"], "errors": result["errors_by_code"]}
    print(f"[frontend-capacity] {label:>10} batch {batch:>5} x{len(served)}: {row['tokens_per_s']:8.0f} tok/s, "
          f"{row['tokens_per_cpu_s']:8.0f} tok/CPU-s, {row['messages_per_token'] or 0:.2f} msg/token, "
          f"client CPU {result['client_cpu_s']:.1f}s{' errors ' + str(row['errors']) if row['errors'] else ''}",
          file=sys.stderr, flush=True)
    return row


def _baseline_tree(rev: str) -> Path | None:
    """An exported copy of the repository at `rev` (the newest revision with router/router.py
    for 'auto'), or None."""
    if rev == "none":
        return None

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)

    if rev == "auto":
        last = git("rev-list", "-n1", "HEAD", "--", "router/router.py").stdout.strip()
        if not last:
            return None
        rev = last if git("cat-file", "-e", f"{last}:router/router.py").returncode == 0 else f"{last}^"
    tree = Path(tempfile.mkdtemp(prefix="fe-baseline-"))
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree if (tree / "router" / "router.py").exists() else None


def summarize_profile(path: Path, top: int = 12) -> dict:
    """py-spy's raw (collapsed) stacks: the share of samples per leaf function and per area."""
    leaf: dict[str, int] = {}
    areas = {"grpc": 0, "asyncio": 0, "ray": 0, "tokenizer": 0, "frontend": 0, "protobuf": 0, "other": 0}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        text = stack
        area = ("tokenizer" if "tokenizers" in text or "detokenizer" in text else
                "frontend" if "router/frontend" in text or "router/server" in text else
                "grpc" if "grpc" in text else "ray" if "/ray/" in text else
                "protobuf" if "protobuf" in text else "asyncio" if "asyncio" in text else "other")
        areas[area] += n
    return {"samples": total, "by_area": {k: v / total for k, v in areas.items()} if total else {},
            "top_leaf": [(k, v / total) for k, v in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]]}


def _run(args) -> dict:
    model = args.model or demo_target()
    batches = [int(b) for b in args.batches.split(",")]
    counts = [int(k) for k in args.frontends.split(",")]
    if args.quick:
        batches, counts, args.duration = batches[:2], counts[:2], 5.0
    tokenizer = load_serving_tokenizer(model)
    text = (Path(__file__).resolve().parents[1] / "report.py").read_text()
    token_ids = [t for t in tokenizer.encode(text, add_special_tokens=False) if t > 2][:4000]
    step_s = args.step_ms / 1000
    ray.init(num_cpus=max(2, os.cpu_count() or 2), namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False)
    served: list[Served] = []
    baseline_tree = _baseline_tree(args.baseline_rev)
    try:
        config = ServeConfig(engine=EngineConfig(model=model),
                             router=RouterConfig(max_in_flight=100_000, actor_call_timeout_s=60.0),
                             pools=(PoolConfig("colocated", args.engines, num_cpus=0),),
                             migration=MigrationConfig(enabled=False),
                             deployment=DeploymentConfig(name=NAMESPACE))
        scheduler = ray.remote(GlobalScheduler).options(name=SCHEDULER_NAME, namespace=NAMESPACE, num_cpus=0,
                                                        max_concurrency=1000).remote(
            config, SimSpawner(NAMESPACE, token_ids, step_s, model), MemoryStore())
        wait_until_ready(scheduler, 120.0)
        gcs = ray.get_runtime_context().gcs_address
        fe_argv = [sys.executable, "-m", "cluster.entrypoints.cli", "frontend", "--address", gcs, "--name",
                   NAMESPACE, "--host", "127.0.0.1", "--port", "0", "--max-in-flight", "100000"]
        frontends = [Served(f"front end {i}", [*fe_argv, "--frontend-id", f"fe-{i}"]) for i in range(max(counts))]
        served.extend(frontends)
        intervals = [float(x) for x in args.stream_intervals_ms.split(",") if x.strip()]
        spaced = {ms: Served(f"front end, stream interval {ms:g} ms",
                             [*fe_argv, "--frontend-id", f"fe-s{ms:g}", "--stream-interval-ms", str(ms)])
                  for ms in intervals}
        served.extend(spaced.values())
        baseline = None
        if baseline_tree is not None:
            baseline = Served("baseline router", [
                sys.executable, str(Path(__file__).resolve().parents[1] / "head_router_driver.py"),
                "--tree", str(baseline_tree), "--address", gcs, "--namespace", NAMESPACE,
                "--instances", ",".join(f"colocated-{i}" for i in range(args.engines)), "--model", model])
            served.append(baseline)
        rounds = []
        profile_path = Path(args.out) / "frontend-capacity-profile.raw" if args.profile else None
        for rep in range(args.repeats):
            for batch in batches:  # interleaved: the baseline, then the new front end, per batch
                if baseline is not None:
                    rounds.append(_round("baseline", [baseline], batch, args) | {"repeat": rep})
                prof = profile_path if profile_path is not None and rep == 0 and batch == batches[len(batches) // 2] \
                    else None
                if prof is not None:
                    prof.parent.mkdir(parents=True, exist_ok=True)
                rounds.append(_round("frontend", frontends[:1], batch, args, prof) | {"repeat": rep})
                for ms, fe in spaced.items():
                    rounds.append(_round(f"frontend {ms:g}ms", [fe], batch, args) | {"repeat": rep})
            for k in counts:
                if k > 1:  # one front end at the largest batch ran just above
                    rounds.append(_round(f"{k} frontends", frontends[:k], batches[-1], args) | {"repeat": rep})
        profile = summarize_profile(profile_path) if profile_path is not None and profile_path.exists() else None
    finally:
        for s in served:
            s.stop()
        with contextlib.suppress(Exception):
            ray.get(ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE).shutdown_deployment.remote(), timeout=60)
        ray.shutdown()
        if baseline_tree is not None:
            shutil.rmtree(baseline_tree, ignore_errors=True)
    return {"study": "frontend-capacity", "config": vars(args) | {"model": model, "cpus": os.cpu_count()},
            "rounds": rounds, "summary": _summary(rounds, batches, counts), "profile": profile}


def _median(rounds, **match) -> dict | None:
    rows = [r for r in rounds if all(r[k] == v for k, v in match.items())]
    if not rows:
        return None
    return {k: statistics.median(r[k] for r in rows) for k in ("tokens_per_s", "tokens_per_cpu_s", "serving_cpu_s")}


def _summary(rounds, batches, counts) -> dict:
    out = {"by_batch": {}, "by_frontends": {}}
    spaced = sorted({r["label"] for r in rounds if r["label"].startswith("frontend ")})
    for b in batches:
        new, base = _median(rounds, label="frontend", batch=b), _median(rounds, label="baseline", batch=b)
        out["by_batch"][b] = {"frontend": new, "baseline": base,
                              "tokens_per_cpu_s_ratio": (new["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
                                                         if new and base and base["tokens_per_cpu_s"] else None)}
        for label in spaced:
            out["by_batch"][b][label] = _median(rounds, label=label, batch=b)
    one = _median(rounds, label="frontend", batch=batches[-1])
    for k in counts:
        row = one if k == 1 else _median(rounds, label=f"{k} frontends", batch=batches[-1])
        out["by_frontends"][k] = row | {"tokens_per_s_vs_one": row["tokens_per_s"] / one["tokens_per_s"]} \
            if row and one and one["tokens_per_s"] else row
    return out


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    by_batch = results["summary"]["by_batch"]
    batches = list(by_batch)
    x = range(len(batches))
    for offset, key, color in ((-0.2, "baseline", "#888"), (0.2, "frontend", "#3a7")):
        values = [(by_batch[b][key] or {}).get("tokens_per_cpu_s", 0) for b in batches]
        left.bar([i + offset for i in x], values, width=0.4, color=color, label=key)
    left.set_xticks(list(x), [str(b) for b in batches])
    left.set_xlabel("concurrent streams")
    left.set_ylabel("tokens per CPU-second (serving process)")
    left.axhline(20_000, color="red", linewidth=1, linestyle="--", label="goal 20k")
    left.legend(fontsize=8)
    left.set_title("one serving process")
    by_fe = results["summary"]["by_frontends"]
    ks = list(by_fe)
    right.bar([str(k) for k in ks], [(by_fe[k] or {}).get("tokens_per_s", 0) for k in ks], color="#37a")
    right.set_xlabel("front ends")
    right.set_ylabel("tokens/s received")
    right.set_title(f"batch {batches[-1]} ({results['config']['cpus']} cores in all)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    results = _run(args)
    path = write_results(args.out, "frontend-capacity", results)
    plot(results, path.with_suffix(".png"))
    print(f"{'batch':>6} {'baseline tok/CPU-s':>19} {'front end tok/CPU-s':>20} {'ratio':>6} {'front end tok/s':>16}")
    for b, row in results["summary"]["by_batch"].items():
        base, new, ratio = row["baseline"], row["frontend"], row["tokens_per_cpu_s_ratio"]
        print(f"{b:>6} {base['tokens_per_cpu_s'] if base else float('nan'):>19.0f} "
              f"{new['tokens_per_cpu_s'] if new else float('nan'):>20.0f} {ratio or float('nan'):>6.2f} "
              f"{new['tokens_per_s'] if new else float('nan'):>16.0f}")
        for label, other in row.items():
            if label.startswith("frontend ") and other:
                print(f"{'':>6} {label}: {other['tokens_per_cpu_s']:.0f} tok/CPU-s, {other['tokens_per_s']:.0f} tok/s")
    for k, row in results["summary"]["by_frontends"].items():
        if row:
            print(f"{k} front end(s): {row['tokens_per_s']:.0f} tok/s, {row['tokens_per_cpu_s']:.0f} tok/CPU-s, "
                  f"x{row.get('tokens_per_s_vs_one', 1.0):.2f} of one")
    if results["profile"]:
        print("profile of one front end:", json.dumps(results["profile"]["by_area"]))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
