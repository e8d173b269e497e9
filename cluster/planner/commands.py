"""The `disagg-serve profile` and `disagg-serve plan` commands: their flags and what they print
and write. cluster/entrypoints/cli.py registers them (and checks that the serve config `plan`
writes is one `up --config` accepts)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.planner.profile import Profile


def load_profile(ref: str) -> Profile:
    """A profile file, or `synthetic:MODEL@GPU` (cluster/planner/synthetic.py)."""
    if ref.startswith("synthetic:"):
        from cluster.planner.synthetic import preset

        return preset(ref.removeprefix("synthetic:"))
    return Profile.load(ref)


# ---------------------------------------------------------------- profile


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the demo target model)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="profile JSON to write (default: profiles/<model>-<host>.json)")
    p.add_argument("--quick", action="store_true", help="a coarse grid (about a minute on 2 cores)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the profiled engine")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="CPU: KV cache per instance, GiB")
    p.add_argument("--dtype", default="auto", help="as the serving engines will run (`up --dtype`)")
    p.add_argument("--cpus-per-instance", type=float, default=1.0,
                   help="Ray CPUs of the profiled instance (as `up --cpus-per-instance`)")
    p.add_argument("--kv-bandwidth-gbps", type=float, default=None,
                   help="KV transfer bandwidth between instances, GB/s (default: measure the same-host path)")
    p.add_argument("--no-progress", action="store_true")


def run_profile_command(args) -> int:
    import platform

    from cluster.config import EngineConfig
    from cluster.models.demo import demo_target
    from cluster.planner.profiler import ProfilePlan, describe_profile, run_profile

    if args.tp != 1:
        print("profile: only TP 1 is measured on this build (engines with --tp > 1 need the "
              "per-pool tensor-parallel support of `up`)", file=sys.stderr)
        return 2
    model = args.model or demo_target()
    config = EngineConfig(model=model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, cpu_kv_cache_gib=args.kv_cache_gib,
                          dtype=args.dtype)
    plan = ProfilePlan.quick() if args.quick else ProfilePlan.full()
    bandwidth = args.kv_bandwidth_gbps * 1e9 if args.kv_bandwidth_gbps else None
    try:
        profile = run_profile(config, plan, tp=args.tp, num_cpus=args.cpus_per_instance, kv_bandwidth=bandwidth,
                              progress=not args.no_progress)
    finally:
        import ray

        ray.shutdown()
    out = Path(args.out or f"profiles/{Path(model.rstrip('/')).name}-{platform.node()}.json")
    profile.save(out)
    print(describe_profile(profile))
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- plan


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="profile JSON (`disagg-serve profile`), or synthetic:MODEL@GPU, e.g. "
                        "synthetic:llama-2-13b@a100-80gb")
    p.add_argument("--catalog", default=None, metavar="FILE",
                   help="Mélange: GPU types with profiles and prices; prints the cheapest mix")
    p.add_argument("--slo-ttft-ms", type=float, required=True)
    p.add_argument("--slo-tpot-ms", type=float, required=True)
    p.add_argument("--attainment", type=float, default=0.9, help="fraction of requests within both SLOs")
    p.add_argument("--rate", type=float, default=None, help="request rate to serve (req/s)")
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--input-len-range", type=float, default=0.0)
    p.add_argument("--output-len-range", type=float, default=0.0)
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--workload", default=None, metavar="FILE",
                   help="YAML/JSON with rate/input-len/output-len, or a `bench --result-json` file to replay")
    p.add_argument("--max-per-pool", type=int, default=4, help="instances per pool in one unit, at most")
    p.add_argument("--max-gpus", type=int, default=8, help="GPUs in one unit, at most")
    p.add_argument("--tp", default=None, help="TP degrees to consider, e.g. 1,2,4 (default: the profile's)")
    p.add_argument("--only", choices=("colocated", "disaggregated"), default=None)
    p.add_argument("--num-requests", type=int, default=200, help="simulated requests per trial")
    p.add_argument("--model", default=None, help="model path to write in the serve config")
    p.add_argument("--out", default="serve-plan.yaml", metavar="FILE", help="serve config to write")
    p.add_argument("--json", default=None, metavar="FILE", help="write the ranked candidates as JSON")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")


def workload_from_args(args):
    from cluster.planner.plan import Workload

    if args.workload:
        w = Workload.from_file(args.workload)
        if args.rate is not None:
            from dataclasses import replace

            w = replace(w, rate=args.rate)
        return w
    missing = [f for f in ("rate", "input_len", "output_len") if getattr(args, f) is None]
    if missing:
        raise SystemExit("error: plan needs --workload FILE or --rate, --input-len and --output-len "
                         f"(missing: {', '.join('--' + m.replace('_', '-') for m in missing)})")
    return Workload(args.rate, args.input_len, args.output_len, args.input_len_range, args.output_len_range,
                    args.burstiness)


def _bar(args, desc: str):
    from tqdm import tqdm

    state: dict = {}

    def update(i: int, total: int, label: str) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="cfg", file=sys.stderr,
                                disable=args.no_progress, dynamic_ncols=True)
        bar = state["bar"]
        bar.n = i
        bar.set_postfix_str(label)
        bar.refresh()

    def close() -> None:
        if "bar" in state:
            state["bar"].n = state["bar"].total
            state["bar"].close()

    return update, close


def run_plan_command(args) -> tuple[int, Path | None]:
    """Prints the ranking (and the Mélange mix); returns (exit code, serve config written)."""
    from cluster.planner.plan import SearchSpace, Slo, format_plan, plan, serve_config, write_serve_config

    if not 0 < args.attainment <= 1:
        raise SystemExit("error: --attainment must be in (0, 1]")
    if args.profile is None and args.catalog is None:
        raise SystemExit("error: plan needs --profile FILE (and/or --catalog FILE)")
    workload = workload_from_args(args)
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.attainment)
    written = None
    if args.profile is not None:
        try:
            profile = load_profile(args.profile)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
        space = SearchSpace(args.max_per_pool, args.max_gpus,
                            tuple(int(t) for t in args.tp.split(",")) if args.tp else None,
                            colocated=args.only != "disaggregated", disaggregated=args.only != "colocated")
        update, close = _bar(args, "plan")
        try:
            result = plan(profile, workload, slo, space, args.num_requests, progress=update)
        finally:
            close()
        print(format_plan(result, args.top))
        if args.json:
            _write_plan_json(args.json, result)
        if result.serve_shape is not None:
            doc = serve_config(result.serve_shape, profile, args.model)
            header = (f"disagg-serve plan: {result.best.shape.label} x {result.best.replicas} for "
                      f"{workload.rate:g} req/s (prompt ~{workload.input_len}, output ~{workload.output_len}) "
                      f"at TTFT {slo.ttft_ms:g} ms / TPOT {slo.tpot_ms:g} ms, attainment {slo.attainment:g}; "
                      f"profile {profile.name}")
            written = write_serve_config(args.out, doc, header)
            print(f"wrote {written}")
        elif args.catalog is None:
            return 1, None
    if args.catalog is not None:
        from cluster.planner.melange import cheapest_mix, format_mix, load_catalog

        update, close = _bar(args, "melange")
        try:
            mix = cheapest_mix(load_catalog(args.catalog), workload, slo, progress=update)
        finally:
            close()
        print(format_mix(mix))
    return 0, written


def _write_plan_json(path: str, result) -> None:
    rows = [{"unit": c.shape.label, "gpus": c.gpus, "goodput_rps": c.goodput,
             "goodput_per_gpu": c.goodput_per_gpu, "unit_cost_per_hour": c.unit_cost_per_hour,
             "shape": vars(c.shape)} for c in result.ranked]
    best = None
    if result.best is not None and result.best.at_rate is not None:
        r = result.best.at_rate
        best = {"unit": result.best.shape.label, "replicas": result.best.replicas,
                "serve": vars(result.serve_shape), "attainment": r.attainment, "goodput": r.result.goodput,
                "p90_ttft_ms": r.result.ttft.p90, "p90_tpot_ms": r.result.tpot.p90}
    doc = {"workload": {k: v for k, v in vars(result.workload).items() if k != "trace"},
           "slo": vars(result.slo), "ranked": rows, "best": best, "notes": result.notes}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2))
