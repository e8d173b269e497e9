"""Speculation that pays, or stays out of the way: no speculative decoding vs vLLM's standard
draft-model speculation (window k) vs TETRIS with the fixed budget N*k vs TETRIS with
SmartSpec's goodput budget, over batch sizes (all requests at once) and Poisson request rates,
in two regimes:

* ``demo``: the demo target and its one-layer draft.  On a CPU the target costs only a few
  draft passes, so speculation cannot pay; SmartSpec should notice and step aside.
* ``wide``: the demo target widened with zero-output layers (``cluster/models/widened.py``):
  the same tokens for several times the compute, the cost ratio of a GPU serving a large
  target with a small draft, where speculation pays.

Engines are in-process (no router), one per mode, built once per regime and warmed up; the
modes of every point run back to back (interleaved, their order rotated per repeat) so that
machine noise hits them alike.  Reported per point: tokens/s, TPOT p50/p99, accepted per
verified draft token, and SmartSpec's share of steps without speculation.  Goals checked
(printed and stored): TETRIS + goodput >= 0.97x the best of the other modes in tokens/s at
every point; calibrated TETRIS >= 1.10x the accepted per verified of standard SD at batch >= 8
(equal capacity N*k).  ``tetris-raw`` (TETRIS, fixed budget, raw draft probabilities) shows
what calibration adds.  JSON + PNG in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from statistics import median

import numpy as np

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results
from cluster.bench.workload import corpus_token_prompts
from cluster.config import EngineConfig
from cluster.engine import vllm_adapter as va  # loads vLLM only when an engine is built
from cluster.models.demo import build_demo_models
from cluster.models.tokenizer import load_serving_tokenizer
from cluster.models.widened import build_widened_target
from cluster.protocol import Sampling
from decode_worker.spec_adapter import install_tetris
from decode_worker.tetris import TetrisConfig

MODES = ("no-spec", "standard", "tetris-fixed", "tetris-raw", "tetris-goodput")
GOODPUT_GOAL, ACCEPT_GOAL = 0.97, 1.10
_STAT_KEYS = ("steps", "request_steps", "proposed", "verified", "accepted", "verified_request_steps",
              "steps_without_speculation", "draft_skipped_steps", "explorations")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regimes", default="demo,wide", help="demo and/or wide (widened target)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--wide-extra-layers", type=int, default=28, help="zero-output layers added (wide)")
    p.add_argument("--batch-sizes", default="1,4,8,16,32,64")
    p.add_argument("--rate-fractions", default="0.25,0.5,0.9",
                   help="request rates as fractions of no-spec's throughput at the largest batch")
    p.add_argument("--rate-requests", type=int, default=32)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--extra", type=int, default=2)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="batch 1,8,32; one repeat; 16 requests per rate")
    p.add_argument("--out", default="bench-results")


def mode_config(mode: str, k: int, extra: int) -> TetrisConfig | None:
    return {
        "no-spec": None,
        "standard": TetrisConfig(k=k, extra=0, budget="fixed", enabled=False),
        "tetris-fixed": TetrisConfig(k=k, extra=extra, budget="fixed"),
        "tetris-raw": TetrisConfig(k=k, extra=extra, budget="fixed", calibrate=False),
        "tetris-goodput": TetrisConfig(k=k, extra=extra, budget="goodput"),
    }[mode]


def _engine(target: str, draft: str, config: TetrisConfig | None):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    engine_config = EngineConfig(model=target, dtype="float32", cpu_kv_cache_gib=0.25, max_num_seqs=64)
    if config is None:
        return va.build_engine(engine_config), None
    engine = va.build_engine(engine_config, speculative=va.speculative_config(draft, config.num_speculative_tokens))
    return engine, install_tetris(engine, config)


def _drive(engine, arrivals: list[tuple[float, list[int]]], output_len: int, temperature: float, tag: str) -> dict:
    """Feed requests at their arrival offsets (seconds), step until all finish; per-request
    first-token and finish times."""
    sampling = Sampling(max_tokens=output_len, temperature=temperature, ignore_eos=True)
    start = time.perf_counter()
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    counts: dict[str, int] = {}
    nxt = 0
    while nxt < len(pending) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while nxt < len(pending) and pending[nxt][1][0] <= now:
            i, (_, prompt) = pending[nxt]
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt}, va.to_sampling_params(sampling))
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[nxt][1][0] - now))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            n = len(out.outputs[0].token_ids)
            if n and out.request_id not in first:
                first[out.request_id] = t
            counts[out.request_id] = counts.get(out.request_id, 0) + n
            if out.finished:
                done[out.request_id] = (t, counts[out.request_id])
    seconds = time.perf_counter() - start
    tpots = [(t - first[r]) / (n - 1) for r, (t, n) in done.items() if n > 1]
    tokens = sum(n for _, n in done.values())
    return {"output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tpot_p50_ms": 1000 * float(np.percentile(tpots, 50)) if tpots else 0.0,
            "tpot_p99_ms": 1000 * float(np.percentile(tpots, 99)) if tpots else 0.0}


def _measure(engine, stats, arrivals, args, tag) -> dict:
    before = stats.snapshot() if stats else None
    row = _drive(engine, arrivals, args.output_len, args.temperature, tag)
    if stats:
        after = stats.snapshot()
        row.update({k: after[k] - before[k] for k in _STAT_KEYS})
        # Why each decision of this run chose its budget (SmartSpec: goodput / no-gain / explore ...).
        decisions = list(stats.history)[-row["steps"]:] if 0 < row["steps"] <= stats.history.maxlen else []
        reasons: dict[str, int] = {}
        for record in decisions:
            reasons[record.reason] = reasons.get(record.reason, 0) + 1
        row["reasons"] = reasons
        for key in ("step_time_predicted_mean_ms", "step_time_measured_mean_ms", "step_time_abs_error_mean_ms"):
            row[key] = after[key]  # over the engine's life so far
        row["calibration_brier_raw"] = after["calibration_brier_raw"]
        row["calibration_brier_calibrated"] = after["calibration_brier_calibrated"]
    return row


def _poisson(prompts, rate: float, seed: int) -> list[tuple[float, list[int]]]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=len(prompts))
    return [(float(t), p) for t, p in zip(np.cumsum(gaps) - gaps[0], prompts, strict=True)]


def run_regime(regime: str, target: str, draft: str, args, modes: list[str]) -> list[dict]:
    batches = [int(b) for b in args.batch_sizes.split(",")]
    fractions = [float(f) for f in args.rate_fractions.split(",")]
    n_prompts = max(max(batches), args.rate_requests)
    prompts = corpus_token_prompts(load_serving_tokenizer(target), n_prompts, args.input_len, seed=1)
    engines = {m: _engine(target, draft, mode_config(m, args.k, args.extra)) for m in modes}
    for m, (engine, stats) in engines.items():  # first-run costs, and SmartSpec's warm-up
        _measure(engine, stats, [(0.0, p) for p in prompts[:16]], args, f"{regime}-warm-{m}")
    rows: list[dict] = []
    rates: list[float] | None = None
    for rep in range(args.repeats):
        order = modes[rep % len(modes):] + modes[:rep % len(modes)]
        points = [("batch", b) for b in batches]
        for kind, value in points + [("rate", f) for f in fractions]:
            if kind == "rate" and rates is None:
                base = [r for r in rows if r["mode"] == "no-spec" and r["batch"] == max(batches)]
                tok_s = base[0]["tokens_per_s"] if base else 1000.0
                rates = [f * tok_s / args.output_len for f in fractions]
            for m in order:
                engine, stats = engines[m]
                tag = f"{regime}-{m}-{kind}{value}-{rep}"
                if kind == "batch":
                    arrivals = [(0.0, p) for p in prompts[:value]]
                    point = {"batch": value}
                else:
                    rate = rates[fractions.index(value)]
                    arrivals = _poisson(prompts[:args.rate_requests], rate, seed=17 + fractions.index(value))
                    point = {"rate_fraction": value, "rate": rate}
                row = _measure(engine, stats, arrivals, args, tag)
                row.update(regime=regime, mode=m, kind=kind, repeat=rep, **point)
                rows.append(row)
                extra = ""
                if row.get("verified"):
                    extra = (f", accepted/verified {row['accepted'] / row['verified']:.2f}, no-spec steps "
                             f"{row['steps_without_speculation'] / max(1, row['steps']):.0%}")
                if m == "tetris-goodput":
                    extra += f", decisions {row.get('reasons')}"
                print(f"{regime:>4} rep{rep} {m:>14} {kind} {value:>5}: {row['tokens_per_s']:8.1f} tok/s, "
                      f"TPOT p50 {row['tpot_p50_ms']:6.1f} ms p99 {row['tpot_p99_ms']:6.1f} ms{extra}",
                      file=sys.stderr, flush=True)
    return rows


def run(args) -> dict:
    if args.quick:
        args.batch_sizes, args.repeats, args.rate_requests = "1,8,32", 1, 16
    demo = build_demo_models()
    draft = str(demo / "draft")
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    rows = []
    targets = {}
    for regime in [r for r in args.regimes.split(",") if r]:
        if regime == "demo":
            targets[regime] = str(demo / "target")
        elif regime == "wide":
            targets[regime] = str(build_widened_target(demo, args.wide_extra_layers))
        else:
            raise SystemExit(f"unknown regime {regime!r}: demo or wide")
        rows += run_regime(regime, targets[regime], draft, args, modes)
    return {"study": "tetris", "config": vars(args) | {"targets": targets, "draft": draft}, "rows": rows}


def _point_key(r: dict) -> tuple:
    return (r["regime"], r["kind"], r.get("batch", r.get("rate_fraction")))


def summarize(results: dict) -> list[dict]:
    """Per (regime, point, mode): medians over repeats (accepted/verified pooled); per point the
    goodput goal; per batch >= 8 the calibration goal."""
    groups: dict[tuple, list[dict]] = {}
    for r in results["rows"]:
        groups.setdefault((*_point_key(r), r["mode"]), []).append(r)
    agg: dict[tuple, dict] = {}
    for (regime, kind, value, mode), rs in groups.items():
        verified = sum(r.get("verified", 0) for r in rs)
        steps = sum(r.get("steps", 0) for r in rs)
        agg[(regime, kind, value, mode)] = {
            "tokens_per_s": median(r["tokens_per_s"] for r in rs),
            "tpot_p50_ms": median(r["tpot_p50_ms"] for r in rs),
            "tpot_p99_ms": median(r["tpot_p99_ms"] for r in rs),
            "accepted_per_verified": sum(r.get("accepted", 0) for r in rs) / verified if verified else None,
            "no_spec_step_share": sum(r.get("steps_without_speculation", 0) for r in rs) / steps if steps else None,
        }
    out = []
    for (regime, kind, value) in sorted({k[:3] for k in agg}, key=lambda k: (k[0], k[1], k[2])):
        modes = {m: agg[(regime, kind, value, m)] for m in MODES if (regime, kind, value, m) in agg}
        entry = {"regime": regime, "kind": kind, "point": value, "modes": modes}
        if "tetris-goodput" in modes and len(modes) > 1:
            others = {m: v["tokens_per_s"] for m, v in modes.items() if m not in ("tetris-goodput", "tetris-raw")}
            best_mode = max(others, key=others.get)
            ratio = modes["tetris-goodput"]["tokens_per_s"] / others[best_mode]
            entry.update(goodput_vs_best=ratio, best_other=best_mode, goodput_goal_met=ratio >= GOODPUT_GOAL)
        std, tet = modes.get("standard"), modes.get("tetris-fixed")
        if kind == "batch" and value >= 8 and std and tet and std["accepted_per_verified"]:
            ratio = tet["accepted_per_verified"] / std["accepted_per_verified"]
            entry.update(accept_vs_standard=ratio, accept_goal_met=ratio >= ACCEPT_GOAL)
            raw = modes.get("tetris-raw")
            if raw and raw["accepted_per_verified"]:
                entry["raw_accept_vs_standard"] = raw["accepted_per_verified"] / std["accepted_per_verified"]
        out.append(entry)
    return out


def plot(results: dict, path) -> None:
    plt = pyplot()
    summary = results["summary"]
    regimes = sorted({s["regime"] for s in summary})
    fig, axes = plt.subplots(len(regimes), 3, figsize=(16, 4.5 * len(regimes)), squeeze=False)
    for row, regime in enumerate(regimes):
        batch = [s for s in summary if s["regime"] == regime and s["kind"] == "batch"]
        rate = [s for s in summary if s["regime"] == regime and s["kind"] == "rate"]
        for mode in MODES:
            style = {"marker": "o", "color": f"C{MODES.index(mode)}", "label": mode}  # one colour per mode
            b = [s for s in batch if mode in s["modes"]]
            if b:
                axes[row][0].plot([s["point"] for s in b], [s["modes"][mode]["tokens_per_s"] for s in b], **style)
                acc = [(s["point"], s["modes"][mode]["accepted_per_verified"]) for s in b
                       if s["modes"][mode]["accepted_per_verified"] is not None]
                if acc:
                    axes[row][1].plot(*zip(*acc, strict=True), **style)
            r = [s for s in rate if mode in s["modes"]]
            if r:
                axes[row][2].plot([s["point"] for s in r], [s["modes"][mode]["tpot_p99_ms"] for s in r], **style)
        for col, (title, xlabel) in enumerate((("tokens/s", "batch size"), ("accepted / verified", "batch size"),
                                               ("TPOT p99 (ms)", "request rate / no-spec capacity"))):
            ax = axes[row][col]
            ax.set_title(f"{regime}: {title}")
            ax.set_xlabel(xlabel)
            if col < 2:
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(args) -> int:
    results = run(args)
    results["summary"] = summarize(results)
    path = write_results(args.out, "tetris", results)
    plot(results, path.with_suffix(".png"))
    print(f"{'regime':>6} {'point':>10} " + " ".join(f"{m:>14}" for m in MODES) + "  goodput/best  acc T/S")
    for s in results["summary"]:
        cells = " ".join(f"{s['modes'][m]['tokens_per_s']:14.1f}" if m in s["modes"] else f"{'-':>14}"
                         for m in MODES)
        point = f"{s['kind']}={s['point']}"
        ratio = f"{s['goodput_vs_best']:.2f}{'' if s['goodput_goal_met'] else '!'}" if "goodput_vs_best" in s else "-"
        acc = f"{s['accept_vs_standard']:.2f}" if "accept_vs_standard" in s else "-"
        print(f"{s['regime']:>6} {point:>10} {cells}  {ratio:>12}  {acc:>7}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
