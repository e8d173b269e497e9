"""The numbers of a benchmark, computed from what the client saw: one RequestRecord per request
(times, token counts, status), and the pure math that turns them into TTFT, per-token ITL, TPOT
and E2E distributions, throughput, goodput and requests in flight (a BenchResult).

Nothing here talks to a server, so all of it is unit tested."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

LATENCIES = ("ttft", "tpot", "itl", "e2e")


def per_token_itl(times: list[float], counts: list[int]) -> list[float]:
    """Inter-token latencies from the token-carrying messages of one stream.

    A message with n tokens that arrives g seconds after the previous one stands for n tokens
    each g/n apart, so batched deltas weigh per token rather than per message. Extra tokens in
    the first message have no gap to measure and are left out."""
    itl: list[float] = []
    for i in range(1, len(times)):
        n = counts[i]
        if n > 0:
            itl.extend([(times[i] - times[i - 1]) / n] * n)
    return itl


@dataclass
class Summary:
    """Latency distribution in milliseconds (None when there were no samples)."""

    count: int = 0
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None

    STATS = ("mean", "median", "p90", "p99")


def summarize(values_s) -> Summary:
    """Mean and percentiles (linear interpolation) of values in seconds, reported in ms."""
    v = np.asarray(list(values_s), dtype=float) * 1000.0
    if v.size == 0:
        return Summary()
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return Summary(int(v.size), float(v.mean()), float(p50), float(p90), float(p99))


def meets_slo(ttft_ms: float | None, tpot_ms: float | None,
              slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """True if a completed request meets every SLO given. A request with one output token has
    no TPOT, so it cannot miss the TPOT objective."""
    if slo_ttft_ms is not None and (ttft_ms is None or ttft_ms > slo_ttft_ms):
        return False
    return not (slo_tpot_ms is not None and tpot_ms is not None and tpot_ms > slo_tpot_ms)


def goodput(samples: list[tuple[float | None, float | None]], duration_s: float,
            slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> float:
    """DistServe goodput: completed requests per second that meet every SLO.

    `samples` are (ttft_ms, tpot_ms) of the completed requests. With no SLO this is the plain
    request throughput."""
    if duration_s <= 0:
        return 0.0
    good = sum(meets_slo(t, p, slo_ttft_ms, slo_tpot_ms) for t, p in samples)
    return good / duration_s


# ---------------------------------------------------------------- per-request records


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds from the benchmark start."""

    index: int
    target_input_len: int
    target_output_len: int
    status: str = "PENDING"  # OK, a gRPC status code name, or a client-side failure
    error: str = ""
    scheduled_s: float = 0.0
    send_s: float | None = None
    end_s: float | None = None  # the final message arrived
    done_s: float | None = None  # the call ended, whether it succeeded or failed
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    served_by: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_s(self) -> float | None:
        if self.send_s is None or not self.chunk_times:
            return None
        return self.chunk_times[0] - self.send_s

    @property
    def e2e_s(self) -> float | None:
        if self.send_s is None or self.end_s is None:
            return None
        return self.end_s - self.send_s

    @property
    def tpot_s(self) -> float | None:
        ttft, e2e = self.ttft_s, self.e2e_s
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    def itl_s(self) -> list[float]:
        return per_token_itl(self.chunk_times, self.chunk_tokens)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("ttft", "tpot", "e2e"):
            value = getattr(self, f"{name}_s")
            d[f"{name}_ms"] = None if value is None else value * 1000.0
        return d


# ---------------------------------------------------------------- results


class RunSettings(Protocol):
    """What the result math reads from a run's configuration: harness.BenchConfig, a dataclass
    that the result also keeps whole (so it is not imported here: the harness imports this)."""

    @property
    def ignore_eos(self) -> bool: ...

    @property
    def slo_ttft_ms(self) -> float | None: ...

    @property
    def slo_tpot_ms(self) -> float | None: ...

    def display_label(self) -> str: ...


@dataclass
class BenchResult:
    label: str
    config: dict
    model: str
    duration_s: float
    completed: int
    failed: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    peak_concurrency: int
    records: list[RequestRecord]
    warnings: list[str] = field(default_factory=list)
    prompt_sizing: str = ""  # how prompt lengths were hit (corpus text has no fixed length)

    @property
    def num_failed(self) -> int:
        return sum(self.failed.values())

    def to_dict(self) -> dict:
        """Flat metrics (vLLM-like keys such as p99_ttft_ms), then config and records."""
        d = {
            "label": self.label, "model": self.model,
            "request_rate": _json_float(self.config.get("request_rate")),
            "duration_s": self.duration_s, "completed": self.completed,
            "num_failed": self.num_failed, "failed": dict(self.failed),
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "goodput": self.goodput, "peak_concurrency": self.peak_concurrency,
        }
        for name in LATENCIES:
            summary: Summary = getattr(self, name)
            for stat in Summary.STATS:
                d[f"{stat}_{name}_ms"] = getattr(summary, stat)
        d["warnings"] = list(self.warnings)
        d["prompt_sizing"] = self.prompt_sizing
        d["config"] = {k: _json_float(v) for k, v in self.config.items()}
        d["requests"] = [r.to_dict() for r in self.records]
        return d


def _json_float(value):
    # JSON has no Infinity; "inf" round-trips through float().
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def in_flight_steps(records: list[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(event times, requests in flight just after each event) from send and done times."""
    events = []
    for r in records:
        if r.send_s is not None:
            stop = next(t for t in (r.done_s, r.end_s, r.send_s) if t is not None)
            events.append((r.send_s, 1))
            events.append((stop, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    times = np.array([t for t, _ in events], dtype=float)
    return times, np.cumsum([step for _, step in events], dtype=int)


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once."""
    _, counts = in_flight_steps(records)
    return int(counts.max()) if counts.size else 0


def consistency_warnings(records: list[RequestRecord], cfg: RunSettings) -> list[str]:
    """Things the server did that the benchmark did not ask for (they skew the numbers)."""
    warnings = []
    done = [r for r in records if r.ok]
    miscounted = [r for r in done if sum(r.chunk_tokens) != r.output_tokens]
    if miscounted:
        warnings.append(f"{len(miscounted)} requests streamed a different number of tokens than "
                        f"their usage.completion_tokens reports")
    if done:
        got = sum(r.prompt_tokens for r in done) / len(done)
        want = sum(r.target_input_len for r in done) / len(done)
        if abs(got - want) > 0.1 * want:
            warnings.append(f"prompts averaged {got:.1f} tokens against {want:.1f} targeted")
    if cfg.ignore_eos:
        short = [r for r in done if r.output_tokens != r.target_output_len]
        if short:
            warnings.append(f"{len(short)} requests with ignore_eos returned a token count other "
                            f"than max_tokens (e.g. request {short[0].index}: "
                            f"{short[0].output_tokens} of {short[0].target_output_len})")
    return warnings


def build_result(cfg: RunSettings, model: str, records: list[RequestRecord],
                 duration_s: float) -> BenchResult:
    done = [r for r in records if r.ok]
    failed: dict[str, int] = {}
    for r in records:
        if not r.ok:
            failed[r.status] = failed.get(r.status, 0) + 1
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    ttft_tpot_ms = [(_ms(r.ttft_s), _ms(r.tpot_s)) for r in done]
    return BenchResult(
        label=cfg.display_label(), config=asdict(cfg), model=model, duration_s=duration_s,
        completed=len(done), failed=dict(sorted(failed.items())),
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=per_s(len(done)), output_throughput=per_s(total_out),
        total_token_throughput=per_s(total_in + total_out),
        goodput=goodput(ttft_tpot_ms, duration_s, cfg.slo_ttft_ms, cfg.slo_tpot_ms),
        ttft=summarize(r.ttft_s for r in done if r.ttft_s is not None),
        tpot=summarize(r.tpot_s for r in done if r.tpot_s is not None),
        itl=summarize(x for r in done for x in r.itl_s()),
        e2e=summarize(r.e2e_s for r in done if r.e2e_s is not None),
        peak_concurrency=peak_concurrency(records), records=records,
        warnings=consistency_warnings(records, cfg),
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
