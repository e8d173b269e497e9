"""Layer-wise push (Splitwise) vs pull for the prefill -> decode hand-off, on one 1P+1D cluster:
the front end's hand-off mode is switched between requests, so both run on the same engines,
interleaved, prompt length by prompt length (256-4096 tokens on the long-context `kv-heavy`
random model: 64 KiB of KV per token). Per request: TTFT (the prefill's token) and the time
from it to the second token (the hand-off plus the decode's first step): pull moves the whole
KV after the prefill, push has moved all but the last layer by then. Printed ratios, JSON + PNG.

Both modes run one request at a time, so the figures are latencies, not throughput."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys

import ray

from cluster.bench.plots import pyplot
from cluster.bench.recorder import StreamRecorder
from cluster.bench.studies.common import write_results
from cluster.client import AsyncClient
from cluster.config import EngineConfig, PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.entrypoints.launcher import start_cluster
from cluster.models.cache import default_models_dir
from cluster.models.random_weights import write_random_model

MODES = ("pull", "layerwise")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="default: the kv-heavy random model (built and cached)")
    p.add_argument("--lengths", default="256,512,1024,2048,4096", help="prompt lengths (tokens)")
    p.add_argument("--reps", type=int, default=5, help="requests per length and mode")
    p.add_argument("--transport", default="auto")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--out", default="bench-results")


def _stats(values: list[float]) -> dict:
    return {"p50_ms": 1000 * statistics.median(values), "mean_ms": 1000 * statistics.fmean(values),
            "min_ms": 1000 * min(values)}


async def _measure(args, model: str) -> dict:
    lengths = [int(x) for x in args.lengths.split(",")]
    config = ServeConfig(
        engine=EngineConfig(model=model, cpu_kv_cache_gib=args.kv_cache_gib, max_model_len=max(lengths) + 64,
                            max_num_batched_tokens=max(lengths) + 64),
        router=RouterConfig(host="127.0.0.1", port=0),
        pools=(PoolConfig("prefill", 1), PoolConfig("decode", 1)),
        transfer=TransferConfig(transport=args.transport))
    cluster = await start_cluster(config)
    frontend = cluster.frontend
    samples = {mode: {n: {"ttft": [], "second": []} for n in lengths} for mode in MODES}
    client = AsyncClient(f"127.0.0.1:{cluster.port}", timeout=300)
    try:
        for n in lengths:
            for rep in range(args.reps + 1):  # the first of each length warms up
                for mode in (MODES if rep % 2 else MODES[::-1]):
                    frontend.transfer = dataclasses.replace(frontend.transfer, push=mode)
                    prompt = [(7 * i + 13 * rep + n) % 500 + 3 for i in range(n)]
                    rec = StreamRecorder(client, prompt, 3, temperature=0.0)
                    await rec.task
                    times = rec.record.chunk_times
                    if rec.final is None or len(times) < 2:
                        raise RuntimeError(f"{mode} {n}: {rec!r}")
                    if rep == 0:
                        continue
                    samples[mode][n]["ttft"].append(rec.record.ttft_s)  # times are from the send already
                    samples[mode][n]["second"].append(times[1] - times[0])
            row = {m: _stats(samples[m][n]["second"])["p50_ms"] for m in MODES}
            print(f"{n} tokens: to 2nd token pull {row['pull']:.1f} ms, layerwise {row['layerwise']:.1f} ms "
                  f"(x{row['pull'] / row['layerwise']:.2f})", file=sys.stderr, flush=True)
    finally:
        await client.close()
        await cluster.stop()
        ray.shutdown()
    return {mode: {str(n): {k: _stats(v) for k, v in per.items()} for n, per in by_len.items()}
            for mode, by_len in samples.items()}


def main(args) -> int:
    model = args.model or str(write_random_model(default_models_dir(), "kv-heavy"))
    measured = asyncio.run(_measure(args, model))
    lengths = [int(x) for x in args.lengths.split(",")]
    results = {"study": "kv-push", "config": vars(args) | {"model": model}, "modes": measured}
    path = write_results(args.out, "kv-push", results)
    print(f"\n{'prompt':>7} | {'TTFT pull':>10} {'TTFT push':>10} | {'2nd pull':>9} {'2nd push':>9} "
          f"{'pull/push':>9} | {'TTFT+2nd pull/push':>18}")
    for n in lengths:
        p, q = measured["pull"][str(n)], measured["layerwise"][str(n)]
        total_p = p["ttft"]["p50_ms"] + p["second"]["p50_ms"]
        total_q = q["ttft"]["p50_ms"] + q["second"]["p50_ms"]
        print(f"{n:>7} | {p['ttft']['p50_ms']:>9.1f}ms {q['ttft']['p50_ms']:>9.1f}ms | "
              f"{p['second']['p50_ms']:>7.1f}ms {q['second']['p50_ms']:>7.1f}ms "
              f"{p['second']['p50_ms'] / q['second']['p50_ms']:>9.2f} | {total_p / total_q:>18.2f}")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft", "TTFT p50 (ms)"), (axes[1], "second", "first token -> second (ms)")):
        for mode in MODES:
            ax.plot(lengths, [measured[mode][str(n)][key]["p50_ms"] for n in lengths], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
