"""The simulator against the real cluster: 1 colocated, 2 colocated and 1 prefill + 1 decode
instances on this machine, each at several request rates. Every cell runs the real cluster
with `disagg-serve bench`'s load generator, then simulates exactly those requests (their send
times, prompt lengths as the server counted them, output lengths) with a profile of this
machine, and compares TTFT / TPOT p50 and p90 and goodput: relative error (sim - real) / real,
the goal being within 15%. Also times the scheduler's dispatch decision in the simulator at
1,000 instances. JSON + PNG.

The profile is measured first (`disagg-serve profile --quick` equivalent) unless --profile
names one; it must be of the same model and engine settings as the cluster here (dtype auto,
0.5 GiB KV cache, 1 CPU per instance). A profile times engine.step() alone; on a small shared
host the serving path (the worker's poll thread, the router, the benchmark client, all on the
same cores) lengthens every step. Those two overheads (per step, per streamed token) are
fitted on the `--calibrate-on` setups' cells (marked * in the table) and the other setups'
cells are predictions. The measured runs are saved (`sim-validation-runs.json`), and
`--runs FILE` re-simulates saved runs without touching the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results

SETUPS = ("colocated-1", "colocated-2", "disagg-1p1d")
METRICS = (("median_ttft_ms", "TTFT p50"), ("p90_ttft_ms", "TTFT p90"), ("median_tpot_ms", "TPOT p50"),
           ("p90_tpot_ms", "TPOT p90"), ("goodput", "goodput"))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--profile", default=None, help="profile JSON of this machine (default: measure one, quick)")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--rates", default="1,2,3", help="request rates (req/s)")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--input-len-range", type=float, default=0.5)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--quick", action="store_true", help="fewer prompts per cell (24)")
    p.add_argument("--dispatch-instances", type=int, default=1000)
    p.add_argument("--calibrate-on", default="colocated-1",
                   help="setups whose cells fit the serving-path overheads ('' for none)")
    p.add_argument("--runs", default=None, help="re-simulate these saved runs (sim-validation-runs.json)")
    p.add_argument("--contention-model", choices=("linear", "host-cpu"), default="linear",
                   help="how the serving path's costs are modelled (see _candidates)")
    p.add_argument("--out", default="bench-results")


def _pools(setup: str):
    from cluster.config import PoolConfig

    return {"colocated-1": (PoolConfig("colocated", 1),), "colocated-2": (PoolConfig("colocated", 2),),
            "disagg-1p1d": (PoolConfig("prefill", 1, resource="disagg_prefill"),
                            PoolConfig("decode", 1, resource="disagg_decode"))}[setup]


def _shape(setup: str):
    from cluster.planner.simulator import ClusterShape

    return {"colocated-1": ClusterShape(colocated=1), "colocated-2": ClusterShape(colocated=2),
            "disagg-1p1d": ClusterShape(prefill=1, decode=1)}[setup]


def _engine(model: str):
    from cluster.config import EngineConfig

    return EngineConfig(model=model, cpu_kv_cache_gib=0.5)


async def _measure(setup: str, model: str, rates: list[float], args) -> list[dict]:
    import ray

    from cluster.bench.harness import BenchConfig, run_benchmark
    from cluster.config import RouterConfig, ServeConfig
    from cluster.entrypoints.launcher import start_cluster

    config = ServeConfig(engine=_engine(model), router=RouterConfig(host="127.0.0.1", port=0), pools=_pools(setup))
    cluster = await start_cluster(config)
    runs = []
    try:
        base = BenchConfig(server=f"127.0.0.1:{cluster.port}", num_prompts=args.num_prompts,
                           input_len=args.input_len, input_len_range=args.input_len_range,
                           output_len=args.output_len, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                           progress=False)
        await run_benchmark(dataclasses.replace(base, num_prompts=4, label="warmup"))
        for rate in rates:
            load_before = os.getloadavg()[0]
            result = await run_benchmark(dataclasses.replace(base, request_rate=rate, label=f"{setup}@{rate:g}"))
            d = result.to_dict()
            d["host_load_avg_1m"] = [load_before, os.getloadavg()[0]]
            runs.append(d)
            print(f"real {setup} rate {rate:g}: TTFT p50 {d['median_ttft_ms']:.0f} ms, TPOT p50 "
                  f"{d['median_tpot_ms']:.1f} ms, goodput {d['goodput']:.2f} req/s", file=sys.stderr, flush=True)
    finally:
        await cluster.stop()
        ray.shutdown()
    return runs


def _candidates(profile, model: str):
    """Profiles with the serving path's two costs over a grid.

    linear:   a cost per engine step and per streamed token, both added to the engine's step
              (the worker's loop and poll thread, and the router and client keeping pace);
              engines slow each other down by the profile's measured pair factor.
    host-cpu: a cost per engine step; the router and client spend CPU per streamed token that
              competes with the engines for the host's 2 / pair_slowdown engine-equivalents
              (Contention.cores / router_cpu_per_token_s)."""
    if model == "linear":
        for step_ms in np.arange(0.0, 20.01, 1.0):
            for token_ms in np.arange(0.0, 6.01, 0.5):
                yield profile.with_changes(overheads=dataclasses.replace(
                    profile.overheads, step_s=step_ms / 1e3, per_token_s=token_ms / 1e3))
        return
    contention = dataclasses.replace(profile.contention, cores=2.0 / profile.contention.pair_slowdown)
    for step_ms in np.arange(0.0, 8.01, 0.5):
        for token_ms in np.arange(0.0, 3.01, 0.25):
            yield profile.with_changes(
                overheads=dataclasses.replace(profile.overheads, step_s=step_ms / 1e3, per_token_s=0.0),
                contention=dataclasses.replace(contention, router_cpu_per_token_s=token_ms / 1e3))


def calibrate(profile, runs: list[tuple[str, dict]], args):
    """The candidate (see _candidates) that best fits these runs' TTFT and TPOT p50 and p90
    (least squared relative error)."""
    best, best_err = profile, float("inf")
    for candidate in _candidates(profile, args.contention_model):
        err = 0.0
        for setup, run in runs:
            sim = simulate_run(candidate, setup, run, args).result.to_dict()
            for key in ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms"):
                e = _error(sim.get(key), run.get(key))
                err += 1.0 if e is None else e * e
        if err < best_err:
            best, best_err = candidate, err
    return best


def simulate_run(profile, setup: str, run: dict, args):
    """The simulator on exactly the requests of a measured run."""
    from cluster.planner.simulator import SimOptions, SimRequest, simulate

    reqs = [SimRequest(float(r["send_s"] if r["send_s"] is not None else r["scheduled_s"]),
                       int(r["prompt_tokens"] or r["target_input_len"]), int(r["target_output_len"]))
            for r in run["requests"]]
    start = min(r.arrival_s for r in reqs)
    reqs = [dataclasses.replace(r, arrival_s=r.arrival_s - start) for r in reqs]
    return simulate(profile, _shape(setup), reqs, SimOptions(slo_ttft_ms=args.slo_ttft_ms,
                                                             slo_tpot_ms=args.slo_tpot_ms, label=run["label"]))


def _error(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real == 0:
        return None
    return (sim - real) / real


def compare(real: dict, sim: dict) -> dict:
    return {key: {"real": real.get(key), "sim": sim.get(key), "error": _error(sim.get(key), real.get(key))}
            for key, _ in METRICS}


def dispatch_timing(num_instances: int) -> dict:
    """Decision time of the simulated scheduler at `num_instances` decode instances (and a
    quarter as many prefill instances) under load: the router's own policies over views built
    from every instance's state for each request, as `Router._pick_decode` does; and
    `pick_dispatch` alone over ready-made views."""
    from cluster.config import FreenessConfig
    from cluster.planner.simulator import ClusterShape, SimOptions, make_workload, simulate
    from cluster.planner.synthetic import preset
    from router.freeness import InstanceView, pick_dispatch

    profile = preset("llama-2-13b@a100-80gb")
    shape = ClusterShape(prefill=max(1, num_instances // 4), decode=num_instances)
    reqs = make_workload(1500, 2.0 * num_instances, 256, 16, seed=0)
    out = simulate(profile, shape, reqs, SimOptions(time_decisions=True, record_tokens=False, migration=False))
    row = {"instances": num_instances, "prefill_instances": shape.prefill, "completed": out.result.completed,
           "sim_wall_s": out.wall_s}
    for role, seconds in out.decision_seconds.items():
        ms = np.array(seconds) * 1e3
        row[f"{role}_decisions"] = int(ms.size)
        row[f"{role}_p50_ms"] = float(np.percentile(ms, 50))
        row[f"{role}_p99_ms"] = float(np.percentile(ms, 99))
    rng = np.random.default_rng(0)
    views = [InstanceView(f"decode-{i}", 2000, int(rng.integers(0, 2000)), int(rng.integers(0, 64)),
                          int(rng.integers(0, 3)), 4) for i in range(num_instances)]
    cfg = FreenessConfig()
    policy_only = []
    for _ in range(500):
        t = time.perf_counter()
        pick_dispatch(views, cfg, 17)
        policy_only.append((time.perf_counter() - t) * 1e3)
    row["pick_dispatch_only_p50_ms"] = float(statistics.median(policy_only))
    row["pick_dispatch_only_p99_ms"] = float(np.percentile(policy_only, 99))
    try:  # the global scheduler's incremental index (router/dispatch_index.py), where it exists
        from router.dispatch_index import DispatchIndex
    except ImportError:
        return row
    index = DispatchIndex(cfg)
    for view in views:
        index.update(view)
    indexed = []
    for i in range(500):
        t = time.perf_counter()
        chosen = index.pick(17)
        # Placing a request changes the chosen instance's view: the index update is part of a decision.
        index.update(dataclasses.replace(views[int(chosen.rpartition("-")[2])], num_running=i % 64))
        indexed.append((time.perf_counter() - t) * 1e3)
    row["dispatch_index_p50_ms"] = float(statistics.median(indexed))
    row["dispatch_index_p99_ms"] = float(np.percentile(indexed, 99))
    return row


def plot(results: dict, path) -> None:
    plt = pyplot()
    cells = results["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {"colocated-1": "o", "colocated-2": "s", "disagg-1p1d": "^"}
    colors = {"TTFT p50": "C0", "TTFT p90": "C1", "TPOT p50": "C2", "TPOT p90": "C3"}
    lat = axes[0]
    values = []
    for cell in cells:
        for key, name in METRICS[:4]:
            c = cell["compare"][key]
            if c["real"] and c["sim"]:
                lat.scatter(c["real"], c["sim"], marker=markers[cell["setup"]], color=colors[name], s=30)
                values += [c["real"], c["sim"]]
    xs = np.geomspace(min(values or [1.0]) * 0.7, max(values or [10.0]) * 1.4, 50)
    lat.plot(xs, xs, "k-", linewidth=0.8)
    lat.fill_between(xs, xs * 0.85, xs * 1.15, color="gray", alpha=0.2, label="±15%")
    lat.set_xscale("log")
    lat.set_yscale("log")
    lat.set_xlabel("measured (ms)")
    lat.set_ylabel("simulated (ms)")
    lat.set_title("latency percentiles (color: metric, marker: setup)")
    for name, color in colors.items():
        lat.scatter([], [], color=color, label=name)
    for setup, m in markers.items():
        lat.scatter([], [], marker=m, color="gray", label=setup)
    lat.legend(fontsize=7)
    gp = axes[1]
    for cell in cells:
        c = cell["compare"]["goodput"]
        gp.scatter(c["real"], c["sim"], marker=markers[cell["setup"]], color="C4")
    top = max([1.0] + [max(cell["compare"]["goodput"]["real"] or 0, cell["compare"]["goodput"]["sim"] or 0)
                       for cell in cells]) * 1.1
    xs = np.linspace(0, top, 20)
    gp.plot(xs, xs, "k-", linewidth=0.8)
    gp.fill_between(xs, xs * 0.85, xs * 1.15, color="gray", alpha=0.2)
    gp.set_xlabel("measured goodput (req/s)")
    gp.set_ylabel("simulated goodput (req/s)")
    gp.set_title("goodput")
    fig.suptitle("simulator vs real cluster (this machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def format_table(results: dict) -> str:
    head = f"{'setup':<12} {'rate':>5} " + " ".join(f"{name:>22}" for _, name in METRICS)
    lines = [head, " " * 19 + " ".join(f"{'real / sim / err':>22}" for _ in METRICS)]
    for cell in results["cells"]:
        parts = []
        for key, _ in METRICS:
            c = cell["compare"][key]
            err = "-" if c["error"] is None else f"{c['error'] * 100:+.0f}%"
            real = "-" if c["real"] is None else f"{c['real']:.1f}"
            sim = "-" if c["sim"] is None else f"{c['sim']:.1f}"
            parts.append(f"{real:>7}/{sim:>7}/{err:>6}")
        mark = "*" if cell.get("calibration") else " "
        lines.append(f"{cell['setup']:<11}{mark} {cell['rate']:>5g} " + " ".join(f"{p:>22}" for p in parts))
    for label, pick in (("all cells", lambda c: True), ("predicted cells", lambda c: not c.get("calibration"))):
        within = [abs(c["error"]) <= 0.15 for cell in results["cells"] if pick(cell)
                  for c in cell["compare"].values() if c["error"] is not None]
        lines.append(f"within 15% ({label}): {sum(within)}/{len(within)} figures")
    o = results.get("serving_overheads_ms")
    if o:
        cores = o["host_cores_engine_equivalents"]
        lines.append(f"serving path ({results['contention_model']}) fitted on "
                     f"{', '.join(results['calibrated_on']) or 'nothing'} (*): {o['per_step']:.1f} ms per engine step"
                     f" + {o['per_token']:.2f} ms per streamed token in the step; router + client "
                     f"{o['router_cpu_per_token']:.2f} ms CPU per streamed token"
                     + (f" sharing {cores:.2f} engine-equivalents of host CPU" if cores else ""))
    return "\n".join(lines)


def format_dispatch(d: dict) -> str:
    return (f"dispatch at {d['instances']} decode instances (views built per decision): p50 "
            f"{d['decode_p50_ms']:.3f} ms, p99 {d['decode_p99_ms']:.3f} ms over {d['decode_decisions']} decisions; "
            f"prefill ({d['prefill_instances']} instances) p99 {d['prefill_p99_ms']:.3f} ms; pick_dispatch alone "
            f"p50 {d['pick_dispatch_only_p50_ms']:.3f} ms, p99 {d['pick_dispatch_only_p99_ms']:.3f} ms"
            + (f"; the scheduler's DispatchIndex (pick + update) p50 {d['dispatch_index_p50_ms']:.3f} ms, "
               f"p99 {d['dispatch_index_p99_ms']:.3f} ms" if "dispatch_index_p50_ms" in d else ""))


def main(args) -> int:
    from cluster.models.demo import demo_target
    from cluster.planner.profile import Profile

    if args.quick:
        args.num_prompts = min(args.num_prompts, 24)
    model = args.model or demo_target()
    rates = [float(r) for r in args.rates.split(",")]
    out = Path(args.out)
    if args.profile:
        profile = Profile.load(args.profile)
    else:
        import ray

        from cluster.planner.profiler import ProfilePlan, run_profile

        try:
            profile = run_profile(_engine(model), ProfilePlan.quick())
        finally:
            ray.shutdown()
        profile.save(out / "sim-validation-profile.json")
    if args.runs:
        measured = json.loads(Path(args.runs).read_text())
    else:
        measured = []
        for setup in args.setups.split(","):
            for rate, run in zip(rates, asyncio.run(_measure(setup, model, rates, args)), strict=True):
                measured.append({"setup": setup, "rate": rate, "run": run})
        out.mkdir(parents=True, exist_ok=True)
        (out / "sim-validation-runs.json").write_text(json.dumps(measured))
    engine_only = profile
    calibrate_on = [s for s in args.calibrate_on.split(",") if s]
    if calibrate_on:
        profile = calibrate(profile, [(m["setup"], m["run"]) for m in measured if m["setup"] in calibrate_on], args)
        profile.save(out / "sim-validation-profile-calibrated.json")
    cells = []
    for m in measured:
        run = m["run"]
        sim = simulate_run(profile, m["setup"], run, args).result.to_dict()
        raw = simulate_run(engine_only, m["setup"], run, args).result.to_dict()
        cells.append({"setup": m["setup"], "rate": m["rate"], "calibration": m["setup"] in calibrate_on,
                      "compare": compare(run, sim), "engine_only": compare(run, raw),
                      "real_completed": run["completed"], "sim_completed": sim["completed"],
                      "host_load_avg_1m": run.get("host_load_avg_1m")})
    results = {"study": "sim-validation", "config": vars(args) | {"model": model}, "profile": profile.name,
               "contention_pair_slowdown": profile.contention.pair_slowdown,
               "contention_model": args.contention_model,
               "serving_overheads_ms": {"per_step": profile.overheads.step_s * 1e3,
                                        "per_token": profile.overheads.per_token_s * 1e3,
                                        "router_cpu_per_token": profile.contention.router_cpu_per_token_s * 1e3,
                                        "host_cores_engine_equivalents": profile.contention.cores},
               "calibrated_on": calibrate_on, "cells": cells}
    print("dispatch timing at", args.dispatch_instances, "instances...", file=sys.stderr, flush=True)
    results["dispatch"] = dispatch_timing(args.dispatch_instances)
    path = write_results(out, "sim-validation", results)
    plot(results, path.with_suffix(".png"))
    print(format_table(results))
    print(format_dispatch(results["dispatch"]))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
