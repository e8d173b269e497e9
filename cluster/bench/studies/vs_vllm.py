"""Side by side with vLLM's own OpenAI server, on the same engine: vLLM's server, ours colocated
(one engine) and ours disaggregated (1 prefill + 1 decode), same model, same engine arguments,
same dataset and rates (a burst, then Poisson arrivals), and the same load generator for all:
vLLM's benchmark module (`vllm bench serve`) against each server's HTTP API.

Each server runs alone (started, warmed up, every rate, stopped), and the servers take turns
`--repeats` times, so slow drift of a shared machine hits them alike; figures are medians over
the repeats. Goals for colocated-1 against vLLM: output tok/s >= 1.0x, TTFT p50 <= 1.1x, TPOT
p50 <= 1.1x. Writes JSON (every run) and a PNG."""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

from cluster.bench.plots import pyplot
from cluster.bench.report import align_columns, format_rate
from cluster.bench.server_process import ServerProcess, our_server_command, vllm_server_command
from cluster.bench.studies.common import write_results
from cluster.bench.vllm_bench import run_vllm_bench
from cluster.models.demo import demo_target

SETUPS = {
    "vllm": None,
    "colocated-1": ["--colocated", "1"],
    "disagg-1p1d": ["--prefill", "1", "--decode", "1"],
    # Diagnostic, not run by default: our engine with the max_num_seqs it had before it took
    # vLLM's defaults (vLLM's server runs 128 on CPU).
    "colocated-1-seqs64": ["--colocated", "1", "--max-num-seqs", "64"],
}
DEFAULT_SETUPS = ("vllm", "colocated-1", "disagg-1p1d")
BASELINE, OURS = "vllm", "colocated-1"
# (metric key in vLLM's result JSON, label, goal as a ratio to vLLM's, higher is better)
METRICS = (
    ("output_throughput", "out tok/s", 1.0, True),
    ("median_ttft_ms", "TTFT p50", 1.1, False),
    ("p99_ttft_ms", "TTFT p99", None, False),
    ("median_tpot_ms", "TPOT p50", 1.1, False),
    ("p99_tpot_ms", "TPOT p99", None, False),
    ("median_itl_ms", "ITL p50", None, False),
)
HTTP_PORT = 18431


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="default: the demo target model")
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    p.add_argument("--rates", default="inf,4,8,12", help="request rates (req/s; inf: all at once)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="turns each server takes (figures: medians)")
    p.add_argument("--warmup-prompts", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="pinned on both sides (vLLM CPU runs 'auto' in bf16)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache per engine, whole GiB (vLLM's "
                                                                "VLLM_CPU_KVCACHE_SPACE takes an integer)")
    p.add_argument("--engine-args", default="",
                   help="more engine flags for every server, with '=': --engine-args='--max-num-seqs 64'")
    p.add_argument("--ours-args", default="", help="flags for our servers only (--ours-args='...')")
    p.add_argument("--vllm-args", default="", help="flags for vLLM's server only (--vllm-args='...')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="40 prompts, rates inf and 8, no disaggregated run")
    p.add_argument("--out", default="bench-results")


def _engine_args(args) -> list[str]:
    """The engine arguments both sides get. Prefix caching is off on ours (load reports and
    migration count free blocks), so vLLM's is turned off too. Both run the model eagerly (our
    default; vLLM's server would otherwise compile it with torch.compile, a different engine)."""
    return ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--seed", str(args.seed),
            "--enforce-eager", *shlex.split(args.engine_args)]


def _server(setup: str, model: str, args, log_path: Path) -> ServerProcess:
    common = _engine_args(args)
    if setup == BASELINE:
        cmd = vllm_server_command(model, HTTP_PORT, [*common, "--no-enable-prefix-caching",
                                                     "--gpu-memory-utilization", "0.15",
                                                     *shlex.split(args.vllm_args)])
        env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    else:
        cmd = our_server_command(SETUPS[setup], model, HTTP_PORT,
                                 [*common, "--kv-cache-gib", str(args.kv_cache_gib), *shlex.split(args.ours_args)])
        env = {}
    return ServerProcess(setup, cmd, HTTP_PORT, log_path, env=env)


def _bench(server: ServerProcess, model: str, args, num_prompts: int, rate: float, log_path: Path) -> dict:
    return run_vllm_bench([
        "--backend", "openai", "--base-url", server.base_url, "--endpoint", "/v1/completions", "--model", model,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
        "--request-rate", str(rate), "--temperature", "0", "--ignore-eos", "--seed", str(args.seed), "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"],
        log_path=log_path)


def _summary(result: dict) -> dict:
    keep = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
            "output_throughput", "max_concurrent_requests")
    out = {k: result.get(k) for k in keep}
    for stat in ("mean", "median", "p90", "p99"):
        for metric in ("ttft", "tpot", "itl", "e2el"):
            key = f"{stat}_{metric}_ms"
            if key in result:
                out[key] = result[key]
    return out


def _run_setup(setup: str, model: str, args, rates: list[float], num_prompts: int, out: Path, turn: int) -> dict:
    logs = out / "vs-vllm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[vs-vllm] turn {turn}: starting {setup}", file=sys.stderr, flush=True)
    with _server(setup, model, args, logs / f"{setup}-{turn}.server.log") as server:
        _bench(server, model, args, args.warmup_prompts, math.inf, logs / f"{setup}-{turn}-warmup.bench.log")
        runs = {}
        for rate in rates:
            t0 = time.monotonic()
            result = _summary(_bench(server, model, args, num_prompts, rate,
                                     logs / f"{setup}-{turn}-rate{format_rate(rate)}.bench.log"))
            runs[format_rate(rate)] = result
            print(f"[vs-vllm] {setup} rate {format_rate(rate)}: {result['output_throughput']:.0f} out tok/s, "
                  f"TTFT p50 {result['median_ttft_ms']:.0f} ms, TPOT p50 {result['median_tpot_ms']:.1f} ms, "
                  f"{result['failed']} failed ({time.monotonic() - t0:.0f}s)", file=sys.stderr, flush=True)
        return {"startup_s": server.startup_s, "command": server.command, "runs": runs}


def _median(turns: list[dict], rate: str, key: str):
    values = [t["runs"][rate][key] for t in turns if t["runs"].get(rate, {}).get(key) is not None]
    return statistics.median(values) if values else None


def aggregate(turns_by_setup: dict[str, list[dict]], rates: list[str]) -> dict[str, dict[str, dict]]:
    """{setup: {rate: {metric: median over turns}}} plus each setup's ratios to vLLM."""
    table: dict[str, dict[str, dict]] = {}
    for setup, turns in turns_by_setup.items():
        table[setup] = {}
        for rate in rates:
            row = {key: _median(turns, rate, key) for key, *_ in METRICS}
            row["failed"] = sum(t["runs"][rate]["failed"] or 0 for t in turns if rate in t["runs"])
            row["completed"] = sum(t["runs"][rate]["completed"] or 0 for t in turns if rate in t["runs"])
            table[setup][rate] = row
    if BASELINE in table:
        for rows in table.values():
            for rate, row in rows.items():
                base = table[BASELINE][rate]
                row["ratio"] = {key: (row[key] / base[key] if row[key] is not None and base[key] else None)
                                for key, *_ in METRICS}
    return table


def goals(table: dict) -> dict[str, dict[str, bool]]:
    """Per rate: colocated-1 against vLLM on each metric that has a goal."""
    out = {}
    if OURS not in table or BASELINE not in table:
        return out
    for rate, row in table[OURS].items():
        met = {}
        for key, _, goal, higher in METRICS:
            ratio = row["ratio"][key]
            if goal is not None and ratio is not None:
                met[key] = ratio >= goal if higher else ratio <= goal
        out[rate] = met
    return out


def format_report(table: dict, rates: list[str]) -> str:
    lines = []
    for rate in rates:
        rows = [["setup", *[label for _, label, *_ in METRICS], "failed"]]
        for setup, by_rate in table.items():
            row = by_rate[rate]
            cells = [setup]
            for key, *_ in METRICS:
                value, ratio = row[key], row.get("ratio", {}).get(key)
                text = "-" if value is None else f"{value:.1f}"
                if ratio is not None and setup != BASELINE:
                    text += f" ({ratio:.2f}x)"
                cells.append(text)
            cells.append(str(row["failed"]))
            rows.append(cells)
        lines.append(f"\n=== rate {rate} req/s ===")
        lines.append(align_columns(rows))
    return "\n".join(lines)


def plot(table: dict, rates: list[str], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    positions = list(range(len(rates)))
    for setup, by_rate in table.items():
        for ax, key in zip(axes, ("output_throughput", "median_ttft_ms", "median_tpot_ms"), strict=True):
            ys = [by_rate[r][key] if by_rate[r][key] is not None else float("nan") for r in rates]
            ax.plot(positions, ys, marker="o", label=setup)
    for ax, name in zip(axes, ("output tokens / s", "TTFT p50 (ms)", "TPOT p50 (ms)"), strict=True):
        ax.set_xticks(positions, [f"{r}" for r in rates])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    model = args.model or demo_target()
    setups = [s for s in args.setups.split(",") if s]
    unknown = set(setups) - set(SETUPS)
    if unknown:
        print(f"unknown setups {sorted(unknown)}; choose from {', '.join(SETUPS)}", file=sys.stderr)
        return 2
    rate_args, num_prompts = args.rates, args.num_prompts
    if args.quick:
        rate_args, num_prompts = "inf,8", 40
        setups = [s for s in setups if s != "disagg-1p1d"]
    rates = [float(r) for r in rate_args.split(",")]
    names = [format_rate(r) for r in rates]
    out = Path(args.out)
    turns: dict[str, list[dict]] = {s: [] for s in setups}
    for turn in range(args.repeats):
        for setup in setups:
            turns[setup].append(_run_setup(setup, model, args, rates, num_prompts, out, turn))
    table = aggregate(turns, names)
    met = goals(table)
    results = {"study": "vs-vllm", "config": vars(args) | {"model": model, "num_prompts": num_prompts,
                                                           "engine_args": _engine_args(args)},
               "table": table, "goals_met": met, "turns": turns}
    path = write_results(out, "vs-vllm", results)
    plot(table, names, path.with_suffix(".png"),
         f"vs vLLM's server: {num_prompts} requests of {args.input_len} in / {args.output_len} out, "
         f"{args.dtype}, medians of {args.repeats} turn(s)")
    print(format_report(table, names))
    for rate, by_metric in met.items():
        print(f"goals at rate {rate}: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in by_metric.items()))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
