"""Disaggregated (1 prefill + 1 decode) vs colocated (2 instances) on a mixed workload
(long and short prompts, long decodes), swept over request rate: TTFT and TPOT p50/p90/p99
and goodput at stated SLOs. Same run, same machine, printed ratios, JSON + PNG."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

import ray

from cluster.bench.harness import BenchConfig, run_benchmark
from cluster.bench.plots import sweep_plot
from cluster.bench.report import compare_table
from cluster.bench.studies.common import write_results
from cluster.config import EngineConfig, PoolConfig, RouterConfig, ServeConfig
from cluster.entrypoints.launcher import start_cluster
from cluster.models.demo import demo_target

SETUPS = {
    "colocated-2": (PoolConfig("colocated", 2),),
    "disagg-1p1d": (PoolConfig("prefill", 1, resource="disagg_prefill"),
                    PoolConfig("decode", 1, resource="disagg_decode")),
}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--rates", default="1,2,4,8", help="request rates to sweep (req/s)")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=384, help="mean prompt length")
    p.add_argument("--input-len-range", type=float, default=0.9,
                   help="prompts in [(1-r)L, (1+r)L]")
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--out", default="bench-results")


async def _sweep(label: str, pools, model: str, args) -> list[dict]:
    config = ServeConfig(engine=EngineConfig(model=model, cpu_kv_cache_gib=0.5),
                         router=RouterConfig(host="127.0.0.1", port=0), pools=pools)
    cluster = await start_cluster(config)
    results = []
    try:
        base = BenchConfig(server=f"127.0.0.1:{cluster.port}", num_prompts=args.num_prompts,
                           input_len=args.input_len, input_len_range=args.input_len_range,
                           output_len=args.output_len, slo_ttft_ms=args.slo_ttft_ms,
                           slo_tpot_ms=args.slo_tpot_ms, progress=False)
        await run_benchmark(dataclasses.replace(base, num_prompts=4, label="warmup"))
        for rate in [float(r) for r in args.rates.split(",")]:
            result = await run_benchmark(dataclasses.replace(base, request_rate=rate, label=label))
            d = result.to_dict()
            d.pop("requests", None)
            results.append(d)
            print(f"{label} rate {rate:g}: TTFT p50 {d['median_ttft_ms']:.0f} ms, TPOT p50 "
                  f"{d['median_tpot_ms']:.1f} ms, goodput {d['goodput']:.2f} req/s",
                  file=sys.stderr, flush=True)
    finally:
        await cluster.stop()
        ray.shutdown()
    return results


def main(args) -> int:
    model = args.model or demo_target()
    runs = {label: asyncio.run(_sweep(label, pools, model, args))
            for label, pools in SETUPS.items()}
    results = {"study": "disagg-vs-colocated", "config": vars(args) | {"model": model},
               "runs": runs}
    path = write_results(args.out, "disagg-vs-colocated", results)
    sweep_plot([r for rs in runs.values() for r in rs], "request_rate",
               str(path.with_suffix(".png")), "disaggregated (1P+1D) vs colocated (2)")
    for i, rate in enumerate(args.rates.split(",")):
        print(f"\n=== request rate {rate} req/s ===")
        print(compare_table({label: rs[i] for label, rs in runs.items()}))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
