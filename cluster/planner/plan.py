"""`disagg-serve plan`: DistServe's placement search, driven by the simulator.

For a workload (request rate, prompt/output lengths, or a workload file) and SLOs (TTFT, TPOT,
attainment), every *unit* shape is simulated — colocated n instances at TP t, or P prefill
instances at TP tp + D decode instances at TP td — and its **goodput** found: the highest
request rate at which at least `attainment` of the requests meet both SLOs (binary search on
the rate; the same seeded requests at every rate, so rates compare like with like). Units are
ranked by goodput per GPU, DistServe's figure of merit. To serve the asked rate R, the best
unit is replicated ceil(R / goodput) times (DistServe's replication step); the replicated
cluster is simulated at R to report its attainment and latencies, and written as a serve
config that `disagg-serve up --config` accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from cluster.planner.profile import Profile
from cluster.planner.simulator import ClusterShape, SimOptions, SimRequest, SimResult, make_workload, simulate


@dataclass(frozen=True)
class Workload:
    rate: float
    input_len: int
    output_len: int
    input_len_range: float = 0.0
    output_len_range: float = 0.0
    burstiness: float = 1.0
    # A recorded workload (lengths and relative arrival times, at `trace_rate` req/s); other
    # rates rescale its arrivals.
    trace: tuple[SimRequest, ...] = ()
    trace_rate: float = 0.0

    def requests(self, num: int, rate: float | None = None, seed: int = 0) -> list[SimRequest]:
        rate = self.rate if rate is None else rate
        if self.trace:
            base = self.trace_rate or rate
            scale = base / rate
            period = self.trace[-1].arrival_s + 1.0 / base
            reqs = []
            for i in range(num):  # loop the trace when more requests are asked for
                r = self.trace[i % len(self.trace)]
                offset = (i // len(self.trace)) * period
                reqs.append(SimRequest((r.arrival_s + offset) * scale, r.prompt_len, r.output_len, r.priority))
            return reqs
        return make_workload(num, rate, self.input_len, self.output_len, self.input_len_range,
                             self.output_len_range, self.burstiness, seed)

    @classmethod
    def from_file(cls, path: str | Path) -> Workload:
        """YAML/JSON with rate, input-len, output-len (and the -range and burstiness keys of
        `disagg-serve bench`), or a `bench --result-json` file whose requests are replayed."""
        doc = yaml.safe_load(Path(path).read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"workload file {path} must be a mapping")
        if "requests" in doc:
            trace = sorted((SimRequest(float(r["scheduled_s"]), int(r["target_input_len"]),
                                       int(r["target_output_len"])) for r in doc["requests"]),
                           key=lambda r: r.arrival_s)
            if not trace:
                raise ValueError(f"workload file {path} has no requests")
            start = trace[0].arrival_s
            trace = [SimRequest(r.arrival_s - start, r.prompt_len, r.output_len) for r in trace]
            span = trace[-1].arrival_s
            measured = (len(trace) - 1) / span if span > 0 else 1.0
            return cls(measured, round(sum(r.prompt_len for r in trace) / len(trace)),
                       round(sum(r.output_len for r in trace) / len(trace)), trace=tuple(trace),
                       trace_rate=measured)
        def get(key: str, default=None):
            return doc.get(key, doc.get(key.replace("-", "_"), default))

        try:
            return cls(float(get("rate", get("request-rate"))), int(get("input-len")), int(get("output-len")),
                       float(get("input-len-range", 0.0)), float(get("output-len-range", 0.0)),
                       float(get("burstiness", 1.0)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"workload file {path} needs rate, input-len and output-len: {exc}") from exc


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float
    attainment: float = 0.9


@dataclass(frozen=True)
class SearchSpace:
    max_per_pool: int = 4
    max_gpus: int = 8
    tp_degrees: tuple[int, ...] | None = None  # None: the profile's
    colocated: bool = True
    disaggregated: bool = True


@dataclass
class Candidate:
    shape: ClusterShape
    goodput: float  # req/s at the attainment target, one unit
    price_per_hour: float | None
    # Filled for the candidates simulated at the asked rate:
    replicas: int = 0
    at_rate: SimResult | None = None

    @property
    def gpus(self) -> int:
        return self.shape.gpus

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.gpus

    @property
    def unit_cost_per_hour(self) -> float | None:
        return None if self.price_per_hour is None else self.price_per_hour * self.gpus


@dataclass
class PlanResult:
    workload: Workload
    slo: Slo
    ranked: list[Candidate]
    best: Candidate | None
    serve_shape: ClusterShape | None
    notes: list[str] = field(default_factory=list)


def candidate_shapes(profile: Profile, space: SearchSpace) -> list[ClusterShape]:
    tps = [t for t in (space.tp_degrees or profile.tp_degrees) if t in profile.parallel]
    shapes = []
    if space.colocated:
        for tp in tps:
            for n in range(1, space.max_per_pool + 1):
                if n * tp <= space.max_gpus:
                    shapes.append(ClusterShape(colocated=n, colocated_tp=tp))
    if space.disaggregated:
        for tp_p in tps:
            for tp_d in tps:
                for p in range(1, space.max_per_pool + 1):
                    for d in range(1, space.max_per_pool + 1):
                        if p * tp_p + d * tp_d <= space.max_gpus:
                            shapes.append(ClusterShape(prefill=p, decode=d, prefill_tp=tp_p, decode_tp=tp_d))
    return shapes


def _options(slo: Slo, base: SimOptions | None, num_requests: int | None = None) -> SimOptions:
    stop = None if num_requests is None else math.floor((1 - slo.attainment) * num_requests)
    return replace(base or SimOptions(), slo_ttft_ms=slo.ttft_ms, slo_tpot_ms=slo.tpot_ms, record_tokens=False,
                   stop_after_misses=stop)


def attainment_at(profile: Profile, shape: ClusterShape, workload: Workload, slo: Slo, rate: float,
                  num_requests: int, options: SimOptions | None = None, seed: int = 0,
                  early_stop: bool = False) -> SimResult:
    """Simulates `num_requests` at `rate`; with `early_stop` the run ends once the attainment
    target can no longer be met (enough for a pass/fail search)."""
    return simulate(profile, shape, workload.requests(num_requests, rate, seed),
                    _options(slo, options, num_requests if early_stop else None))


def max_goodput(profile: Profile, shape: ClusterShape, workload: Workload, slo: Slo, num_requests: int = 200,
                options: SimOptions | None = None, rel_tol: float = 0.03, seed: int = 0,
                min_duration_s: float = 30.0) -> float:
    """The highest rate (req/s) with attainment >= slo.attainment (0 when even a trickle
    misses): doubling to bracket it, then bisection to `rel_tol`. Each trial sends at least
    `num_requests` and at least `min_duration_s` of arrivals (a short burst at a high rate
    ends before queues reach their steady state, and would overstate the goodput)."""
    def ok(rate: float) -> bool:
        n = max(num_requests, math.ceil(rate * min_duration_s))
        run = attainment_at(profile, shape, workload, slo, rate, n, options, seed, early_stop=True)
        return run.attainment >= slo.attainment

    low, high = 0.0, max(0.25, _rate_hint(profile, shape, workload, slo))
    while ok(high):
        low, high = high, high * 2
        if high > 1e5:
            return high
    if low == 0.0:
        # Does anything pass? Probe downwards before giving up.
        probe = high / 2
        while probe > 1e-3 and not ok(probe):
            probe /= 2
        if probe <= 1e-3:
            return 0.0
        low, high = probe, probe * 2
    while (high - low) / high > rel_tol:
        mid = (low + high) / 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low


def _rate_hint(profile: Profile, shape: ClusterShape, workload: Workload, slo: Slo) -> float:
    """Half the closed-form capacity of the unit (req/s): where the search starts."""
    from cluster.planner.capacity import decode_tokens_per_s, prefill_tokens_per_s

    prompt, output = workload.input_len, workload.output_len
    tpot_s = slo.tpot_ms / 1000
    if shape.disaggregated:
        prefill = shape.prefill * prefill_tokens_per_s(profile, shape.prefill_tp, prompt) / prompt
        decode = shape.decode * decode_tokens_per_s(profile, shape.decode_tp, prompt, output, tpot_s) / max(1, output)
        return 0.5 * min(prefill, decode)
    per_request_s = (prompt / prefill_tokens_per_s(profile, shape.colocated_tp, prompt)
                     + output / max(1e-9, decode_tokens_per_s(profile, shape.colocated_tp, prompt, output, tpot_s)))
    return 0.5 * shape.colocated / per_request_s


def plan(profile: Profile, workload: Workload, slo: Slo, space: SearchSpace = SearchSpace(),
         num_requests: int = 200, options: SimOptions | None = None, progress=None,
         min_duration_s: float = 30.0) -> PlanResult:
    """Ranks every unit shape by goodput per GPU; replicates the best to serve workload.rate."""
    shapes = candidate_shapes(profile, space)
    ranked = []
    for i, shape in enumerate(shapes):
        if progress is not None:
            progress(i, len(shapes), shape.label)
        rate = max_goodput(profile, shape, workload, slo, num_requests, options, min_duration_s=min_duration_s)
        ranked.append(Candidate(shape, rate, profile.price_per_gpu_hour))
    ranked.sort(key=lambda c: (-c.goodput_per_gpu, c.gpus, c.shape.label))
    result = PlanResult(workload, slo, ranked, None, None)
    viable = [c for c in ranked if c.goodput > 0]
    if not viable:
        result.notes.append("no configuration meets the SLOs at any rate: loosen them or add hardware")
        return result
    _choose_serving(result, profile, viable, num_requests, options, min_duration_s)
    return result


def _choose_serving(result: PlanResult, profile: Profile, viable: list[Candidate], num_requests: int,
                    options: SimOptions | None, min_duration_s: float, top: int = 5, extra: int = 2) -> None:
    """DistServe's replication, checked: for the best `top` units, the fewest replicas (from
    ceil(rate / goodput), up to `extra` more) whose cluster meets the attainment at the asked
    rate in simulation; the cluster with the fewest GPUs wins (ties: the better unit). Replicas
    are independent on GPUs, not when every instance shares one CPU host (contention), which
    is why the replicated cluster is simulated as a whole."""
    rate, slo = result.workload.rate, result.slo
    chosen = None
    first_try = None
    for cand in viable[:top]:
        k0 = max(1, math.ceil(rate / cand.goodput))
        for k in range(k0, k0 + extra + 1):
            shape = replicate(cand.shape, k)
            if chosen is not None and shape.gpus >= chosen[1].gpus:
                break
            n = max(num_requests * k, math.ceil(rate * min_duration_s))
            run = attainment_at(profile, shape, result.workload, slo, rate, n, options)
            if first_try is None:
                first_try = (cand, shape, k, run)
            if run.attainment >= slo.attainment:
                chosen = (cand, shape, k, run)
                break
    if chosen is None:
        cand, shape, k, run = first_try
        result.notes.append(f"no replicated cluster of the top {top} units reaches {slo.attainment} attainment at "
                            f"{rate:g} req/s (the best unit x {k}: {run.attainment:.2f}); on a shared host more "
                            "instances contend for the same cores")
    else:
        cand, shape, k, run = chosen
    cand.replicas, cand.at_rate = k, run
    result.best, result.serve_shape = cand, shape


def replicate(shape: ClusterShape, k: int) -> ClusterShape:
    return replace(shape, colocated=shape.colocated * k, prefill=shape.prefill * k, decode=shape.decode * k)


def serve_config(shape: ClusterShape, profile: Profile, model: str | None = None) -> dict:
    """A `disagg-serve up --config` document for the shape (TP keys only where the degree is
    not 1: they need a build with per-pool tensor parallelism)."""
    pools = ({"colocated": shape.colocated} if not shape.disaggregated
             else {"prefill": shape.prefill, "decode": shape.decode})
    doc: dict = {}
    model = model or profile.model.get("path")
    if model:
        doc["model"] = model
    doc["pools"] = pools
    for role in ("colocated", "prefill", "decode"):
        if shape.count(role) and shape.tp(role) != 1:
            doc["pools"][f"{role}-tp"] = shape.tp(role)
    doc["engine"] = {"max-model-len": profile.max_model_len, "max-num-seqs": profile.max_num_seqs}
    if profile.max_num_batched_tokens:
        doc["engine"]["max-num-batched-tokens"] = profile.max_num_batched_tokens
    return doc


def write_serve_config(path: str | Path, doc: dict, header: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(doc, sort_keys=False)
    path.write_text(text)
    return path


def format_plan(result: PlanResult, top: int = 10) -> str:
    slo = result.slo
    lines = [f"workload: {result.workload.rate:g} req/s, prompt ~{result.workload.input_len} tokens, output "
             f"~{result.workload.output_len}; SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms, "
             f"attainment {slo.attainment:g}",
             f"{'rank':>4}  {'unit':<22} {'GPUs':>4} {'goodput':>9} {'per GPU':>8} {'$/h':>8}"]
    for i, c in enumerate(result.ranked[:top], 1):
        cost = f"{c.unit_cost_per_hour:.2f}" if c.unit_cost_per_hour is not None else "-"
        lines.append(f"{i:>4}  {c.shape.label:<22} {c.gpus:>4} {c.goodput:>7.2f}/s {c.goodput_per_gpu:>8.3f} {cost:>8}")
    best = result.best
    if best is not None and best.at_rate is not None and result.serve_shape is not None:
        r = best.at_rate.result
        cost = (f", ${best.unit_cost_per_hour * best.replicas:.2f}/h" if best.unit_cost_per_hour is not None else "")
        lines.append(f"best: {best.shape.label} x {best.replicas} = {result.serve_shape.label} "
                     f"({result.serve_shape.gpus} GPUs{cost}); simulated at {result.workload.rate:g} req/s: "
                     f"attainment {best.at_rate.attainment:.3f}, goodput {r.goodput:.2f} req/s, TTFT p90 "
                     f"{_ms(r.ttft.p90)}, TPOT p90 {_ms(r.tpot.p90)}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"
