"""Benchmark results as PNG figures: latency CDFs and output tokens over time of one run, and
latency percentiles and goodput of several runs swept over one knob. `pyplot()` is the one way
the benchmarks and studies get matplotlib."""

from __future__ import annotations

import math

import numpy as np

from cluster.bench.records import BenchResult, RequestRecord, in_flight_steps
from cluster.bench.report import format_rate


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (servers have no display)."""
    # Imported here: matplotlib is heavy, and only runs that write a plot need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms, title: str, slo_ms: float | None = None) -> None:
    v = np.sort(np.asarray(values_ms, dtype=float))
    if v.size:
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post")
        for q, style in ((50, ":"), (99, "--")):
            x = np.percentile(v, q)
            ax.axvline(x, color="gray", linestyle=style, linewidth=1, label=f"p{q} {x:.1f} ms")
    if slo_ms is not None:
        ax.axvline(slo_ms, color="red", linewidth=1, label=f"SLO {slo_ms:g} ms")
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if v.size or slo_ms is not None:
        ax.legend(fontsize=8, loc="lower right")


def token_rate_series(records: list[RequestRecord], duration_s: float, bins: int = 40,
                      min_width_s: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(bin centers s, output tokens/s in each bin). Bins are at least min_width_s wide: the
    engine emits tokens in steps, and narrower bins only show that step rhythm."""
    width = max(duration_s / bins, min_width_s)
    # The last bin ends at the run's end, so a partial bin is not diluted by idle time; a sliver
    # shorter than half a bin joins the one before it instead of making a noisy point.
    edges = np.arange(0.0, duration_s, width)
    if edges.size > 1 and duration_s - edges[-1] < width / 2:
        edges[-1] = duration_s
    else:
        edges = np.append(edges, duration_s)
    if edges.size < 2:
        return np.zeros(0), np.zeros(0)
    times = [t for r in records for t in r.chunk_times]
    weights = [n for r in records for n in r.chunk_tokens]
    counts, _ = np.histogram(times, bins=edges, weights=weights)
    widths = np.maximum(np.diff(edges), 1e-9)
    return (edges[:-1] + edges[1:]) / 2, counts / widths


def plot_result(result: BenchResult, path: str) -> None:
    """2x2: TTFT, TPOT and E2E CDFs, and output tokens/s with requests in flight over time."""
    plt = pyplot()
    done = [r for r in result.records if r.ok]
    cfg = result.config
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _cdf(axes[0, 0], [r.ttft_s * 1000 for r in done if r.ttft_s is not None],
         "TTFT CDF", cfg.get("slo_ttft_ms"))
    _cdf(axes[0, 1], [r.tpot_s * 1000 for r in done if r.tpot_s is not None],
         "TPOT CDF", cfg.get("slo_tpot_ms"))
    _cdf(axes[1, 0], [r.e2e_s * 1000 for r in done if r.e2e_s is not None], "E2E latency CDF")
    ax = axes[1, 1]
    centers, tok_s = token_rate_series(result.records, result.duration_s)
    ax.plot(centers, tok_s, marker=".", label="output tok/s")
    ax.set_title("Output tokens over time")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens / s")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    times, in_flight = in_flight_steps(result.records)
    twin.step(np.r_[0.0, times], np.r_[0, in_flight], where="post", color="tab:orange",
              alpha=0.7, label="requests in flight")
    twin.set_ylabel("requests in flight")
    twin.set_ylim(bottom=0)
    twin.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    fig.suptitle(f"{result.label}: {result.completed} ok, {result.num_failed} failed, "
                 f"rate {format_rate(cfg['request_rate'])} req/s, "
                 f"{result.output_throughput:.1f} out tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _x_value(result: dict, x_key: str) -> float:
    value = result.get(x_key, result.get("config", {}).get(x_key))
    if value is None:
        raise KeyError(f"no {x_key!r} in a result (top level or config)")
    return float(value)


def sweep_plot(results: list[dict], x_key: str, path: str, title: str) -> None:
    """Latency percentiles and goodput of several result JSONs against one knob (e.g.
    request_rate); results with different labels become separate series."""
    plt = pyplot()
    series: dict[str, list[dict]] = {}
    for r in results:
        series.setdefault(r.get("label") or "run", []).append(r)
    xs_all = [_x_value(r, x_key) for r in results]
    finite = [x for x in xs_all if math.isfinite(x)]
    inf_at = (max(finite) * 1.25 if finite else 1.0)  # inf gets its own tick past the rest

    def place(x: float) -> float:
        return x if math.isfinite(x) else inf_at

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(series.items()):
        runs = sorted(runs, key=lambda r: _x_value(r, x_key))
        xs = [place(_x_value(r, x_key)) for r in runs]
        color = colors[i % len(colors)]
        for ax, metric in ((axes[0], "ttft"), (axes[1], "tpot")):
            for stat, style, marker in (("median", "-", "o"), ("p90", "--", "s"),
                                        ("p99", ":", "^")):
                ys = [_nan(r.get(f"{stat}_{metric}_ms")) for r in runs]
                ax.plot(xs, ys, style, marker=marker, color=color, label=f"{label} {stat}")
        axes[2].plot(xs, [_nan(r.get("goodput")) for r in runs], "-", marker="o", color=color,
                     label=f"{label} goodput")
        axes[2].plot(xs, [_nan(r.get("request_throughput")) for r in runs], ":", marker="x",
                     color=color, label=f"{label} throughput")
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)", "requests / s"), strict=True):
        ax.set_xlabel(x_key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if len(finite) < len(xs_all):
            ticks = sorted(set(finite)) + [inf_at]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["inf"])
    axes[0].set_title("TTFT")
    axes[1].set_title("TPOT")
    axes[2].set_title("Goodput and throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _nan(value) -> float:
    return float("nan") if value is None else float(value)
