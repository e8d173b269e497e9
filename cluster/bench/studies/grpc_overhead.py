"""Tokens/s through the gRPC path (client -> front end -> worker actors) vs the same engine
actors driven in-process (no router, no gRPC), same requests, same run.

Each round also records where the machine's CPU went (psutil): the engine processes' CPU-seconds
and everything else's (this process, which holds the front end and the load client, Ray, the
scheduler), against the round's wall time x cores. On a machine whose engines compute on the
CPU, whatever the serving path spends is taken from the engines: the split shows how much of
the gap that explains."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path

import psutil
import ray

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results
from cluster.bench.workload import corpus_token_prompts
from cluster.client import AsyncClient
from cluster.config import EngineConfig, PoolConfig, RouterConfig, ServeConfig
from cluster.entrypoints.launcher import start_cluster
from cluster.models.demo import demo_target
from cluster.models.tokenizer import load_serving_tokenizer
from cluster.protocol import EngineRequest, Sampling


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-results")


async def _grpc_round(address: str, prompts, output_len: int) -> dict:
    client = AsyncClient(address)
    start = time.perf_counter()
    done = await asyncio.gather(*[
        client.generate(p, max_tokens=output_len, temperature=0.0, ignore_eos=True)
        for p in prompts])
    seconds = time.perf_counter() - start
    await client.close()
    return {"output_tokens": sum(c.completion_tokens for c in done), "seconds": seconds}


async def _local_round(actors, prompts, output_len: int, tag: str) -> dict:
    sampling = Sampling(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    shares = [[] for _ in actors]
    for i, p in enumerate(prompts):  # the same round-robin split the router makes
        shares[i % len(actors)].append(EngineRequest(f"local-{tag}-{i}", tuple(p), sampling))
    start = time.perf_counter()
    parts = await asyncio.gather(*[a.run_local.remote(s)
                                   for a, s in zip(actors, shares, strict=True)])
    seconds = time.perf_counter() - start
    return {"output_tokens": sum(p["output_tokens"] for p in parts), "seconds": seconds}


async def _run(args) -> dict:
    model = args.model or demo_target()
    config = ServeConfig(engine=EngineConfig(model=model, cpu_kv_cache_gib=0.5),
                         router=RouterConfig(host="127.0.0.1", port=0),
                         pools=(PoolConfig("colocated", args.instances),))
    cluster = await start_cluster(config)
    try:
        prompts = corpus_token_prompts(load_serving_tokenizer(model), args.num_requests,
                                       args.input_len)
        address = f"127.0.0.1:{cluster.port}"
        # The same engine actors the front end streams from, driven directly.
        links = [link for _, link in sorted(cluster.frontend.links.items())]
        actors = [link.actor for link in links]
        meter = CpuMeter([pid for link in links for pid in (link.info.pid, *link.info.rank_pids) if pid])
        await _grpc_round(address, prompts[:4], 8)  # warm-up both paths
        await _local_round(actors, prompts[:4], 8, "warm")
        rounds = {"grpc": [], "in_process": []}
        for r in range(args.repeats):  # interleaved so drift hits both paths alike
            rounds["grpc"].append(await _metered(meter, _grpc_round(address, prompts, args.output_len)))
            rounds["in_process"].append(
                await _metered(meter, _local_round(actors, prompts, args.output_len, str(r))))
            print(f"round {r + 1}/{args.repeats}: gRPC {_tps(rounds['grpc'][-1]):.1f} tok/s, "
                  f"in-process {_tps(rounds['in_process'][-1]):.1f} tok/s",
                  file=sys.stderr, flush=True)
    finally:
        await cluster.stop()
        ray.shutdown()
    summary = {k: statistics.median(_tps(x) for x in v) for k, v in rounds.items()}
    cpu = {k: {f: statistics.median(x[f] / x["capacity_cpu_s"] for x in v)
               for f in ("engine_cpu_s", "other_cpu_s")} for k, v in rounds.items()}
    return {
        "study": "grpc-overhead",
        "config": vars(args) | {"model": model},
        "rounds": rounds,
        "tokens_per_s_median": summary,
        "ratio_grpc_over_in_process": summary["grpc"] / summary["in_process"],
        # Shares of the machine's CPU (wall x cores) per path: engines vs everything else.
        "cpu_share_median": cpu,
    }


class CpuMeter:
    """CPU-seconds of the engine processes (and their children) and of the whole machine."""

    def __init__(self, engine_pids: list[int]):
        found: dict[int, psutil.Process] = {}  # by pid: an actor's pid is also its rank 0's
        for pid in engine_pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                found.update({p.pid: p for p in (proc, *proc.children(recursive=True))})
        self.engines = list(found.values())

    def _engine_s(self) -> float:
        total = 0.0
        for proc in self.engines:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    @staticmethod
    def _busy_s() -> float:
        t = psutil.cpu_times()
        return t.user + t.system + t.nice + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def start(self) -> None:
        self._at = (time.perf_counter(), self._engine_s(), self._busy_s())

    def stop(self) -> dict:
        wall, engine, busy = (b - a for a, b in zip(self._at, (time.perf_counter(), self._engine_s(),
                                                                self._busy_s()), strict=True))
        return {"engine_cpu_s": engine, "other_cpu_s": max(0.0, busy - engine),
                "capacity_cpu_s": wall * (psutil.cpu_count() or 1)}


async def _metered(meter: CpuMeter, round_coro) -> dict:
    meter.start()
    result = await round_coro
    return result | meter.stop()


def _tps(r: dict) -> float:
    return r["output_tokens"] / r["seconds"]


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["in-process", "gRPC path"]
    per_round = [[_tps(r) for r in results["rounds"]["in_process"]],
                 [_tps(r) for r in results["rounds"]["grpc"]]]
    ax.bar(labels, [statistics.median(v) for v in per_round], color=["#888", "#3a7"])
    for i, v in enumerate(per_round):
        ax.scatter([i] * len(v), v, color="k", zorder=3, s=12)
    ax.set_ylabel("output tokens/s (median of rounds)")
    ax.set_title(f"gRPC path / in-process = {results['ratio_grpc_over_in_process']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    results = asyncio.run(_run(args))
    path = write_results(args.out, "grpc-overhead", results)
    plot(results, path.with_suffix(".png"))
    s = results["tokens_per_s_median"]
    print(f"{'path':<12}{'tok/s (median)':>16}")
    print(f"{'in-process':<12}{s['in_process']:>16.1f}")
    print(f"{'gRPC':<12}{s['grpc']:>16.1f}")
    for route, share in results["cpu_share_median"].items():
        print(f"{route}: engines {100 * share['engine_cpu_s']:.0f}% of the machine's CPU, "
              f"everything else {100 * share['other_cpu_s']:.0f}%")
    print(f"ratio gRPC / in-process: {results['ratio_grpc_over_in_process']:.3f}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
