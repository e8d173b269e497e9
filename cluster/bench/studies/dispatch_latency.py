"""How long the global scheduler takes to decide where a decode request goes, with 100 and 1,000
simulated decode instances (random loads, changing as snapshots arrive and requests are
placed): the pre-split Router's way (a freeness view of every ready instance built per request,
then freeness.pick_dispatch over them) against GlobalScheduler.place (the DispatchIndex, plus
the placement's bookkeeping), interleaved decision by decision in one process. Optionally also
`place` through a Ray actor call (what a front end waits for). p50/p99/max in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import ray

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results
from cluster.config import DeploymentConfig, EngineConfig, MigrationConfig, PoolConfig, ServeConfig
from cluster.kv.layout import blocks_for_tokens
from cluster.protocol import InstanceInfo, LiveRequest, LoadReport
from router.freeness import pick_dispatch
from router.instances import Instance, InstanceState
from router.scheduler import GlobalScheduler, MemoryStore

BLOCK = 16


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", default="100,1000")
    p.add_argument("--decisions", type=int, default=5000, help="per instance count")
    p.add_argument("--report-every", type=int, default=10,
                   help="a snapshot of one instance arrives every this many decisions")
    p.add_argument("--ray", action="store_true", help="also time place() as a Ray actor call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")


class _NoSpawner:
    def spawn(self, role, instance_id):
        raise RuntimeError("simulated instances are not spawned")

    def find(self, instance_id):
        return None

    def running_instances(self):
        return []

    def kill(self, actor):
        pass


def _load(rng: random.Random, iid: str) -> LoadReport:
    total = 4096
    running = rng.randint(0, 64)
    waiting = rng.choice([0, 0, 0, 1, 4])
    return LoadReport(iid, total, rng.randint(0, total), running, waiting, 0,
                      head_waiting_blocks=rng.randint(1, 64) if waiting else 0)


def build(n: int, seed: int) -> tuple[GlobalScheduler, random.Random]:
    rng = random.Random(seed)
    config = ServeConfig(engine=EngineConfig(model="sim"), pools=(PoolConfig("decode", n),),
                         migration=MigrationConfig(enabled=False, high_priority_headroom_blocks=8),
                         deployment=DeploymentConfig(name="dispatch-latency"))
    sched = GlobalScheduler(config, _NoSpawner(), MemoryStore(), autostart=False)
    for i in range(n):
        iid = f"decode-{i}"
        info = InstanceInfo(iid, "decode", "node", "sim", 1 << 16, BLOCK, 4096, 32000, (2,), 1)
        inst = Instance(info, actor=None, state=InstanceState.READY)
        sched.instances[iid] = inst
        inst.observe(_load(rng, iid), [])
        sched.view_changed(inst)
    # start() would find and watch real engines; these are ready as built. Without this, place()
    # only answers "the scheduler is starting" (and the study would time that).
    sched.started = True
    return sched, rng


def _old_way(sched: GlobalScheduler, needed_tokens: int, priority: int) -> str | None:
    """The pre-split Router's decode dispatch: a view of every ready instance, then a pass."""
    ready = [i for i in sched.instances.values() if i.ready and i.role == "decode"]
    views = [sched.migration.decode_view(i) for i in ready]
    return pick_dispatch(views, sched.migration.freeness, blocks_for_tokens(needed_tokens + 1, BLOCK), priority)


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else 0.0


def _stats_us(values_s: list[float]) -> dict:
    us = [v * 1e6 for v in values_s]
    return {"p50_us": _pct(us, 0.5), "p99_us": _pct(us, 0.99), "max_us": max(us), "mean_us": statistics.mean(us)}


def run_one(n: int, args) -> dict:
    sched, rng = build(n, args.seed + n)
    old, new, agree = [], [], 0
    names = list(sched.instances)
    for k in range(args.decisions):
        tokens, priority = rng.randint(16, 2048), rng.choice([0, 0, 0, 0, 1])
        t0 = time.perf_counter()
        want = _old_way(sched, tokens, priority)
        t1 = time.perf_counter()
        got = sched.place("decode", f"r{k}@1", tokens, priority)
        t2 = time.perf_counter()
        if "instance_id" not in got:
            raise RuntimeError(f"place() decided nothing: {got}")
        old.append(t1 - t0)
        new.append(t2 - t1)
        agree += got.get("instance_id") == want
        if k % args.report_every == 0:  # a snapshot: fresh load, placements seen or done
            iid = rng.choice(names)
            inst = sched.instances[iid]
            inst.observe(_load(rng, iid), [LiveRequest(e, "fe", 100, 0) for e in list(inst.pending)[:2]])
            sched.view_changed(inst)
    return {"instances": n, "decisions": args.decisions, "old": _stats_us(old), "new": _stats_us(new),
            "same_choice": agree / args.decisions}


def run_ray(n: int, args) -> dict:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(_ScheduledSim).options(num_cpus=0).remote(n, args.seed)
        ray.get(actor.ready.remote())

        async def go():
            times = []
            for k in range(min(args.decisions, 2000)):
                t0 = time.perf_counter()
                await actor.place.remote(k)
                times.append(time.perf_counter() - t0)
            return times

        return {"instances": n, "through_ray": _stats_us(asyncio.run(go()))}
    finally:
        ray.shutdown()


class _ScheduledSim:
    """A scheduler with simulated instances inside a Ray actor."""

    def __init__(self, n: int, seed: int):
        self.sched, self.rng = build(n, seed)

    def ready(self) -> bool:
        return True

    def place(self, k: int) -> dict:
        return self.sched.place("decode", f"r{k}@1", self.rng.randint(16, 2048))


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = results["runs"]
    labels = [str(r["instances"]) for r in rows]
    x = range(len(rows))
    for offset, key, color in ((-0.2, "old", "#888"), (0.2, "new", "#3a7")):
        ax.bar([i + offset for i in x], [r[key]["p99_us"] for r in rows], width=0.4, color=color,
               label=f"{key} p99")
        ax.scatter([i + offset for i in x], [r[key]["p50_us"] for r in rows], color="k", zorder=3, s=12)
    ax.axhline(1000, color="red", linestyle="--", linewidth=1, label="goal: p99 < 1 ms")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("decode instances")
    ax.set_ylabel("decision time, µs (dots: p50)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    runs = [run_one(int(n), args) for n in args.instances.split(",")]
    through_ray = [run_ray(int(n), args) for n in args.instances.split(",")] if args.ray else []
    results = {"study": "dispatch-latency", "config": vars(args), "runs": runs, "through_ray": through_ray}
    path = write_results(args.out, "dispatch-latency", results)
    plot(results, path.with_suffix(".png"))
    print(f"{'instances':>9} {'old p50/p99 µs':>18} {'new p50/p99 µs':>18} {'p99 old/new':>12} {'same choice':>12}")
    for r in runs:
        print(f"{r['instances']:>9} {r['old']['p50_us']:>8.1f}/{r['old']['p99_us']:<9.1f} "
              f"{r['new']['p50_us']:>8.1f}/{r['new']['p99_us']:<9.1f} {r['old']['p99_us'] / r['new']['p99_us']:>12.1f} "
              f"{100 * r['same_choice']:>11.1f}%")
    for r in through_ray:
        t = r["through_ray"]
        print(f"{r['instances']:>9} through a Ray actor call: p50 {t['p50_us']:.0f} µs, p99 {t['p99_us']:.0f} µs")
    print(f"wrote {path} and {path.with_suffix('.png')}", file=sys.stderr)
    return 0
