"""DistServe's placement question on a published-style setting: a 13B model (Llama-2-13B) on
A100-80GB GPUs, its profile synthesized from public specs (cluster/planner/synthetic.py states
the sources and assumptions), a chatbot-like workload. For each TPOT objective, `plan`'s search
finds the best colocated unit and the best disaggregated unit (counts and per-phase TP) and
their goodput per GPU at 90% attainment. DistServe's qualitative result is that
disaggregation wins per GPU when the TPOT objective is tight (a colocated engine's prefill
steps stall every decode in the batch) and colocation catches up as it loosens. Simulation
only (no GPU here); JSON + PNG.
"""

from __future__ import annotations

import argparse
import sys

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="synthetic:llama-2-13b@a100-80gb")
    p.add_argument("--tpot-ms", default="25,30,40,60,100", help="TPOT objectives to sweep")
    p.add_argument("--ttft-ms", type=float, default=1000.0)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--len-range", type=float, default=0.5)
    p.add_argument("--max-per-pool", type=int, default=2)
    p.add_argument("--max-gpus", type=int, default=4)
    p.add_argument("--tp", default="1,2")
    p.add_argument("--num-requests", type=int, default=150)
    p.add_argument("--out", default="bench-results")


def run(args) -> dict:
    from cluster.planner.commands import load_profile
    from cluster.planner.plan import SearchSpace, Slo, Workload, plan

    profile = load_profile(args.profile)
    workload = Workload(args.rate, args.input_len, args.output_len, args.len_range, args.len_range)
    rows = []
    for tpot in [float(t) for t in args.tpot_ms.split(",")]:
        slo = Slo(args.ttft_ms, tpot, args.attainment)
        space = SearchSpace(args.max_per_pool, args.max_gpus, tuple(int(t) for t in args.tp.split(",")))
        result = plan(profile, workload, slo, space, args.num_requests)
        best = {}
        for mode in ("colocated", "disaggregated"):
            cands = [c for c in result.ranked if c.shape.disaggregated == (mode == "disaggregated")]
            top = max(cands, key=lambda c: (c.goodput_per_gpu, -c.gpus))
            best[mode] = {"unit": top.shape.label, "gpus": top.gpus, "goodput": top.goodput,
                          "per_gpu": top.goodput_per_gpu}
        ratio = (best["disaggregated"]["per_gpu"] / best["colocated"]["per_gpu"]
                 if best["colocated"]["per_gpu"] > 0 else float("inf"))
        rows.append({"tpot_ms": tpot, "best": best, "disagg_over_colocated": ratio,
                     "ranked": [{"unit": c.shape.label, "gpus": c.gpus, "goodput": c.goodput}
                                for c in result.ranked]})
        print(f"TPOT {tpot:g} ms: colocated {best['colocated']['unit']} {best['colocated']['per_gpu']:.2f}/GPU, "
              f"disaggregated {best['disaggregated']['unit']} {best['disaggregated']['per_gpu']:.2f}/GPU, "
              f"ratio {ratio:.2f}x", file=sys.stderr, flush=True)
    return {"study": "distserve-13b", "config": vars(args), "profile": profile.name,
            "profile_notes": profile.notes, "rows": rows}


def plot(results: dict, path) -> None:
    plt = pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["tpot_ms"] for r in rows]
    for mode, style in (("colocated", "s--"), ("disaggregated", "o-")):
        ax.plot(xs, [r["best"][mode]["per_gpu"] for r in rows], style, label=f"best {mode}")
        for x, r in zip(xs, rows, strict=True):
            ax.annotate(r["best"][mode]["unit"], (x, r["best"][mode]["per_gpu"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 4))
    ax.set_xlabel("TPOT objective (ms)")
    ax.set_ylabel("goodput per GPU (req/s at 90% attainment)")
    ax.set_title(f"{results['profile']}: DistServe placement (simulated)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    results = run(args)
    path = write_results(args.out, "distserve-13b", results)
    plot(results, path.with_suffix(".png"))
    print(f"{'TPOT ms':>8} {'best colocated':>22} {'/GPU':>6} {'best disaggregated':>22} {'/GPU':>6} {'ratio':>6}")
    for r in results["rows"]:
        c, d = r["best"]["colocated"], r["best"]["disaggregated"]
        print(f"{r['tpot_ms']:>8g} {c['unit']:>22} {c['per_gpu']:>6.2f} {d['unit']:>22} {d['per_gpu']:>6.2f} "
              f"{r['disagg_over_colocated']:>5.2f}x")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
