"""TETRIS vs vLLM's standard draft-model speculative decoding (window k, same verification
capacity) vs no speculative decoding, on the demo target/draft pair, over batch sizes and
(k, e). Same run, printed ratios, JSON + PNG.

Standard SD is vLLM's own: the draft proposes k tokens and every request verifies all k.
TETRIS: the draft proposes k + e tokens and the batch's N*k verification slots go to the
positions most likely to be accepted. Engines run in-process (no router), one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results
from cluster.bench.workload import corpus_token_prompts
from cluster.config import EngineConfig
from cluster.engine import vllm_adapter as va  # loads vLLM only when an engine is built
from cluster.models.demo import build_demo_models
from cluster.models.tokenizer import load_serving_tokenizer
from cluster.protocol import Sampling
from decode_worker.spec_adapter import install_tetris
from decode_worker.tetris import TetrisConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None)
    p.add_argument("--draft", default=None)
    p.add_argument("--batch-sizes", default="1,4,8,16,32")
    p.add_argument("--ks", default="2,3,4")
    p.add_argument("--extras", default="1,2,3")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out", default="bench-results")


def _engine(target: str, draft: str | None, k: int, extra: int, tetris: bool):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    config = EngineConfig(model=target, dtype="float32", cpu_kv_cache_gib=0.125,
                          max_num_seqs=64)
    if draft is None:
        return va.build_engine(config), None
    tconf = TetrisConfig(k=k, extra=extra, enabled=tetris)
    speculative = va.speculative_config(draft, tconf.num_speculative_tokens)
    engine = va.build_engine(config, speculative=speculative)
    return engine, install_tetris(engine, tconf)


def _run_batch(engine, prompts, output_len: int, temperature: float, tag: str) -> dict:
    sampling = Sampling(max_tokens=output_len, temperature=temperature, ignore_eos=True, seed=0)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p},
                           va.to_sampling_params(dataclasses.replace(sampling, seed=i)))
    tokens, steps, start = 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += len(out.outputs[0].token_ids)
        steps += 1
    return {"output_tokens": tokens, "seconds": time.perf_counter() - start, "engine_steps": steps}


def _measure(engine, stats, prompts, args, tag) -> dict:
    _run_batch(engine, prompts[:2], 8, args.temperature, f"warm-{tag}")
    before = stats.snapshot() if stats else None
    run = _run_batch(engine, prompts, args.output_len, args.temperature, tag)
    row = {"tokens_per_s": run["output_tokens"] / run["seconds"], **run}
    if stats:
        after = stats.snapshot()
        counters = ("steps", "request_steps", "proposed", "verified", "accepted",
                    "verified_request_steps")
        delta = {k: after[k] - before[k] for k in counters}
        row.update(delta)
        row["accepted_per_step"] = delta["accepted"] / max(1, delta["steps"])
        row["accepted_per_request_step"] = (delta["accepted"]
                                            / max(1, delta["verified_request_steps"]))
        row["acceptance_rate"] = delta["accepted"] / max(1, delta["verified"])
    return row


def run(args) -> dict:
    demo = build_demo_models() if not (args.target and args.draft) else None
    target, draft = args.target or str(demo / "target"), args.draft or str(demo / "draft")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ks, extras = [int(k) for k in args.ks.split(",")], [int(e) for e in args.extras.split(",")]
    prompts = corpus_token_prompts(load_serving_tokenizer(target), max(batches), args.input_len,
                                   seed=1)
    rows = []
    # Engines stay referenced until the end: freeing an in-process vLLM engine tears down
    # process-global state the others still use.
    engines = []

    def sweep(label, k, e, draft_model, tetris):
        engine, stats = _engine(target, draft_model, k, e, tetris)
        engines.append(engine)
        for b in batches:
            row = _measure(engine, stats, prompts[:b], args, f"{label}-{k}-{e}-{b}")
            row.update(mode=label, k=k, extra=e, batch=b)
            rows.append(row)
            spec = ""
            if "accepted_per_step" in row:
                spec = (f", accepted/step {row['accepted_per_step']:.2f}, "
                        f"acceptance {row['acceptance_rate']:.2f}")
            print(f"{label:>9} k={k} e={e} batch={b:>2}: {row['tokens_per_s']:8.1f} tok/s{spec}",
                  file=sys.stderr, flush=True)

    sweep("no-spec", 0, 0, None, False)
    for k in ks:
        sweep("standard", k, 0, draft, False)
        for e in extras:
            sweep("tetris", k, e, draft, True)
    return {"study": "tetris", "config": vars(args) | {"target": target, "draft": draft},
            "rows": rows}


def summarize(results: dict) -> list[dict]:
    """Per (k, e, batch): TETRIS vs standard (same k) vs no-spec ratios."""
    rows = results["rows"]
    std = {(r["k"], r["batch"]): r for r in rows if r["mode"] == "standard"}
    base = {r["batch"]: r for r in rows if r["mode"] == "no-spec"}
    out = []
    for r in rows:
        if r["mode"] != "tetris":
            continue
        s, n = std[(r["k"], r["batch"])], base[r["batch"]]
        out.append({
            "k": r["k"], "extra": r["extra"], "batch": r["batch"],
            "tetris_accepted_per_step": r["accepted_per_step"],
            "standard_accepted_per_step": s["accepted_per_step"],
            "accepted_ratio": (r["accepted_per_step"] / s["accepted_per_step"]
                               if s["accepted_per_step"] else None),
            "tetris_tok_s": r["tokens_per_s"], "standard_tok_s": s["tokens_per_s"],
            "no_spec_tok_s": n["tokens_per_s"],
            "speed_ratio_vs_standard": r["tokens_per_s"] / s["tokens_per_s"],
            "speed_ratio_vs_no_spec": r["tokens_per_s"] / n["tokens_per_s"],
            "tetris_acceptance": r["acceptance_rate"], "standard_acceptance": s["acceptance_rate"],
        })
    return out


def plot(results: dict, path) -> None:
    plt = pyplot()
    summary = results["summary"]
    ks = sorted({r["k"] for r in summary})
    fig, axes = plt.subplots(2, len(ks), figsize=(5 * len(ks), 8), squeeze=False)
    for col, k in enumerate(ks):
        for e in sorted({r["extra"] for r in summary}):
            rs = sorted((r for r in summary if r["k"] == k and r["extra"] == e),
                        key=lambda r: r["batch"])
            xs = [r["batch"] for r in rs]
            axes[0][col].plot(xs, [r["accepted_ratio"] for r in rs], "o-", label=f"e={e}")
            axes[1][col].plot(xs, [r["speed_ratio_vs_standard"] for r in rs], "o-",
                              label=f"TETRIS e={e} / standard")
        min_extra = min(r2["extra"] for r2 in summary)
        rs = sorted((r for r in summary if r["k"] == k and r["extra"] == min_extra),
                    key=lambda r: r["batch"])
        axes[1][col].plot([r["batch"] for r in rs],
                          [r["standard_tok_s"] / r["no_spec_tok_s"] for r in rs], "k--",
                          label="standard / no-spec")
        for row, title in ((0, "accepted tokens/step: TETRIS / standard"), (1, "tokens/s ratio")):
            ax = axes[row][col]
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_title(f"k={k}: {title}")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(args) -> int:
    results = run(args)
    results["summary"] = summarize(results)
    path = write_results(args.out, "tetris", results)
    plot(results, path.with_suffix(".png"))
    print(f"{'k':>2} {'e':>2} {'batch':>5} {'acc/step T':>10} {'acc/step S':>10} {'ratio':>6} "
          f"{'tok/s T':>8} {'tok/s S':>8} {'tok/s none':>10} {'T/S':>5}")
    for r in results["summary"]:
        ratio = f"{r['accepted_ratio']:.2f}" if r["accepted_ratio"] is not None else "-"
        print(f"{r['k']:>2} {r['extra']:>2} {r['batch']:>5} {r['tetris_accepted_per_step']:>10.2f} "
              f"{r['standard_accepted_per_step']:>10.2f} {ratio:>6} {r['tetris_tok_s']:>8.1f} "
              f"{r['standard_tok_s']:>8.1f} {r['no_spec_tok_s']:>10.1f} "
              f"{r['speed_ratio_vs_standard']:>5.2f}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
