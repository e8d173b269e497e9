"""Benchmark results as text: the summary table `disagg-serve bench` prints (vLLM bench serve
style), and a side-by-side comparison of labeled result JSONs with ratios to a baseline."""

from __future__ import annotations

import math
import os

from cluster.bench.records import LATENCIES, BenchResult, Summary

LATENCY_TITLES = {
    "ttft": "Time to first token",
    "tpot": "Time per output token (after the first)",
    "itl": "Inter-token latency (per token)",
    "e2e": "End-to-end request latency",
}

# (result JSON key, row title) of compare_table.
COMPARE_METRICS = (
    ("completed", "Completed"), ("num_failed", "Failed"), ("duration_s", "Duration (s)"),
    ("request_throughput", "Requests/s"), ("output_throughput", "Output tok/s"),
    ("total_token_throughput", "Total tok/s"), ("goodput", "Goodput (req/s)"),
) + tuple((f"{stat}_{name}_ms", f"{stat.replace('median', 'p50')} {name.upper()} (ms)")
          for name in LATENCIES for stat in Summary.STATS)


def format_rate(rate) -> str:
    """A request rate as the CLI takes it: "inf" or the shortest number."""
    rate = float(rate)
    return "inf" if math.isinf(rate) else f"{rate:g}"


def format_cell(value, digits: int = 2) -> str:
    """A table cell: "-" for no value, floats to `digits` places."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(result: BenchResult) -> str:
    width = 56
    cfg = result.config
    rows: list[tuple[str, object] | str] = [
        _banner(" disagg-serve benchmark ", "=", width),
        ("Label", result.label), ("Model", _short_model(result.model)),
        ("Requests completed", result.completed), ("Requests failed", result.num_failed),
    ]
    rows += [(f"  {code}", n) for code, n in result.failed.items()]
    rows += [
        ("Arrival rate (req/s)", format_rate(cfg["request_rate"])),
        ("Burstiness", cfg["burstiness"]),
        ("Max concurrency", cfg["max_concurrency"] or "unlimited"),
        ("Peak requests in flight", result.peak_concurrency),
        ("Duration (s)", result.duration_s),
        ("Prompt tokens, total", result.total_input_tokens),
        ("Output tokens, total", result.total_output_tokens),
        ("Request throughput (req/s)", result.request_throughput),
        ("Output token throughput (tok/s)", result.output_throughput),
        ("Total token throughput (tok/s)", result.total_token_throughput),
        (_goodput_label(cfg), result.goodput),
    ]
    for name in LATENCIES:
        summary: Summary = getattr(result, name)
        rows.append(_banner(f" {LATENCY_TITLES[name]} ", "-", width))
        short = name.upper()
        rows += [(f"{stat.capitalize() if stat != 'median' else 'Median (p50)'} {short} (ms)",
                  getattr(summary, stat)) for stat in Summary.STATS]
    rows.append("=" * width)
    lines = [r if isinstance(r, str) else _row(r[0], format_cell(r[1]), width) for r in rows]
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _short_model(model: str) -> str:
    # Model directories are long absolute paths; the last two parts say which model it is.
    parts = [p for p in model.split(os.sep) if p]
    return os.path.join(*parts[-2:]) if model.startswith(os.sep) and parts else model


def _row(name: str, value: str, width: int) -> str:
    label = f"{name}:"
    return f"{label}{value:>{max(width - len(label), len(value) + 1)}}"


def _goodput_label(cfg: dict) -> str:
    slos = []
    if cfg.get("slo_ttft_ms") is not None:
        slos.append(f"TTFT<={cfg['slo_ttft_ms']:g}ms")
    if cfg.get("slo_tpot_ms") is not None:
        slos.append(f"TPOT<={cfg['slo_tpot_ms']:g}ms")
    return f"Goodput, {' '.join(slos)} (req/s)" if slos else "Goodput, no SLO (req/s)"


def _banner(text: str, fill: str, width: int) -> str:
    return text.center(width, fill)


def compare_table(results: dict[str, dict]) -> str:
    """Labeled result JSONs side by side; every column after the first also shows its ratio to
    the first (baseline) column."""
    labels = list(results)
    rows = [["metric", *labels]]
    for key, title in COMPARE_METRICS:
        base = results[labels[0]].get(key) if labels else None
        row = [title]
        for i, label in enumerate(labels):
            value = results[label].get(key)
            cell = format_cell(value)
            numeric = isinstance(value, (int, float)) and isinstance(base, (int, float))
            if i > 0 and numeric and base:
                cell += f" (x{value / base:.2f})"
            row.append(cell)
        rows.append(row)
    return align_columns(rows)


def align_columns(rows: list[list[str]]) -> str:
    """Rows of cells as text: a header row, a rule under it, then the rest; the first column
    left-aligned (names), the others right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
