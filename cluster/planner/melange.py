"""Mélange's cheapest GPU mix: given a catalog of GPU types (a profile and a price per hour
each), the set of instances that serves a workload within its SLOs at the lowest cost.

Following Mélange (Griggs et al., 2024): the workload is cut into request-size buckets
(prompt length x output length); for each GPU type and bucket, the simulator finds the
highest rate one instance of that type sustains within the SLOs for requests of that size
(its "slice" capacity, attainment included, so queueing is counted); then an integer linear
program picks how many instances of each type to run and which fraction of each bucket's load
each type takes:

    minimize    sum_g price_g * n_g
    subject to  sum_g x[b,g] = 1                                 every bucket fully served
                sum_b load_b * x[b,g] / cap[b,g] <= n_g          instances of g carry their share
                x[b,g] = 0 where cap[b,g] = 0                    (g cannot meet the SLO for b)
                0 <= n_g <= available_g, n_g integer

An instance here is one colocated engine at the catalog entry's TP degree (Mélange's unit is a
GPU type serving whole requests); `plan` decides disaggregation within one GPU type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from cluster.planner.plan import Slo, Workload, max_goodput
from cluster.planner.profile import Profile
from cluster.planner.simulator import ClusterShape


@dataclass(frozen=True)
class GpuOption:
    """One catalog entry: an instance type built from GPUs of one kind."""

    name: str
    profile: Profile
    price_per_hour: float  # per GPU
    tp: int = 1
    available: int | None = None  # instances at most (None: unbounded)

    @property
    def instance_price(self) -> float:
        return self.price_per_hour * self.tp


def load_catalog(path: str | Path) -> list[GpuOption]:
    """YAML: `gpus: [{name, profile, price-per-hour, tp, available}]`; `profile` is a profile
    file (relative to the catalog) or `synthetic:MODEL@GPU` (cluster/planner/synthetic.py);
    `price-per-hour` defaults to the profile's."""
    from cluster.planner.synthetic import preset

    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    entries = doc.get("gpus") if isinstance(doc, dict) else None
    if not entries:
        raise ValueError(f"catalog {path} needs a non-empty `gpus:` list")
    options = []
    for entry in entries:
        ref = str(entry["profile"])
        profile = preset(ref.removeprefix("synthetic:")) if ref.startswith("synthetic:") \
            else Profile.load(path.parent / ref)
        price = entry.get("price-per-hour", entry.get("price_per_hour", profile.price_per_gpu_hour))
        if price is None:
            raise ValueError(f"catalog {path}: {entry.get('name', ref)} has no price-per-hour")
        tp = int(entry.get("tp", min(profile.tp_degrees)))
        if tp not in profile.parallel:
            raise ValueError(f"catalog {path}: {ref} has no TP {tp} (has {profile.tp_degrees})")
        options.append(GpuOption(str(entry.get("name", profile.name)), profile, float(price), tp,
                                 entry.get("available")))
    return options


@dataclass(frozen=True)
class Bucket:
    input_len: int
    output_len: int
    share: float  # fraction of requests


def buckets(workload: Workload, num_requests: int = 2000, edges_in: tuple[int, ...] = (),
            edges_out: tuple[int, ...] = ()) -> list[Bucket]:
    """Request-size buckets of the workload (its lengths, quantile edges when none are given):
    each bucket is represented by its mean lengths."""
    reqs = workload.requests(num_requests)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    e_in = np.array(edges_in or np.unique(np.quantile(ins, [0.5])))
    e_out = np.array(edges_out or np.unique(np.quantile(outs, [0.5])))
    bi, bo = np.digitize(ins, e_in), np.digitize(outs, e_out)
    out = []
    for i in np.unique(bi):
        for o in np.unique(bo):
            mask = (bi == i) & (bo == o)
            if mask.any():
                out.append(Bucket(int(round(ins[mask].mean())), int(round(outs[mask].mean())),
                                  float(mask.mean())))
    return out


@dataclass
class MixResult:
    options: list[GpuOption]
    buckets: list[Bucket]
    capacity: np.ndarray  # [bucket, option] req/s per instance
    counts: list[int]
    assignment: np.ndarray  # [bucket, option] fraction of the bucket's load
    cost_per_hour: float
    single_type_costs: dict[str, float | None] = field(default_factory=dict)
    status: str = "optimal"


def slice_capacity(option: GpuOption, bucket: Bucket, slo: Slo, num_requests: int = 150) -> float:
    """Requests/s of this size one instance of `option` sustains within the SLOs."""
    w = Workload(1.0, bucket.input_len, bucket.output_len)
    return max_goodput(option.profile, ClusterShape(colocated=1, colocated_tp=option.tp), w, slo, num_requests)


def solve_mix(loads: np.ndarray, capacity: np.ndarray, prices: np.ndarray,
              available: list[int | None]) -> tuple[list[int], np.ndarray, str]:
    """The ILP of the module docstring (scipy's HiGHS MILP). loads[b] req/s, capacity[b, g]
    req/s per instance, prices[g] per instance-hour. Returns (counts, assignment, status)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    nb, ng = capacity.shape
    # Variables: n_g (ng), then x[b, g] row-major (nb * ng).
    c = np.concatenate([prices, np.zeros(nb * ng)])
    rows, lo, hi = [], [], []
    for b in range(nb):  # sum_g x[b, g] = 1
        row = np.zeros(ng + nb * ng)
        row[ng + b * ng: ng + (b + 1) * ng] = 1.0
        rows.append(row)
        lo.append(1.0)
        hi.append(1.0)
    for g in range(ng):  # sum_b load_b / cap[b, g] * x[b, g] - n_g <= 0
        row = np.zeros(ng + nb * ng)
        row[g] = -1.0
        for b in range(nb):
            if capacity[b, g] > 0:
                row[ng + b * ng + g] = loads[b] / capacity[b, g]
        rows.append(row)
        lo.append(-np.inf)
        hi.append(0.0)
    upper = np.concatenate([[a if a is not None else np.inf for a in available],
                            [1.0 if capacity[b, g] > 0 else 0.0 for b in range(nb) for g in range(ng)]])
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=np.concatenate([np.ones(ng), np.zeros(nb * ng)]),
               bounds=Bounds(np.zeros(ng + nb * ng), upper))
    if res.x is None:
        return [0] * ng, np.zeros((nb, ng)), res.message
    counts = [int(round(v)) for v in res.x[:ng]]
    return counts, res.x[ng:].reshape(nb, ng), "optimal" if res.success else res.message


def cheapest_mix(options: list[GpuOption], workload: Workload, slo: Slo, num_requests: int = 150,
                 progress=None) -> MixResult:
    bs = buckets(workload)
    cap = np.zeros((len(bs), len(options)))
    total = len(bs) * len(options)
    for b, bucket in enumerate(bs):
        for g, option in enumerate(options):
            if progress is not None:
                progress(b * len(options) + g, total, f"{option.name}: {bucket.input_len}+{bucket.output_len} tokens")
            cap[b, g] = slice_capacity(option, bucket, slo, num_requests)
    loads = np.array([workload.rate * bucket.share for bucket in bs])
    prices = np.array([o.instance_price for o in options])
    counts, assignment, status = solve_mix(loads, cap, prices, [o.available for o in options])
    result = MixResult(options, bs, cap, counts, assignment, float(np.dot(prices, counts)), status=status)
    for g, option in enumerate(options):  # what each type alone would cost (Mélange's baselines)
        alone = [option.available if i == g else 0 for i in range(len(options))]
        n, _, st = solve_mix(loads, cap, prices, alone)
        result.single_type_costs[option.name] = float(np.dot(prices, n)) if st == "optimal" else None
    return result


def format_mix(mix: MixResult) -> str:
    lines = [f"{'GPU type':<14} {'TP':>3} {'$/h/inst':>9} " + " ".join(
        f"{f'{b.input_len}+{b.output_len}':>10}" for b in mix.buckets) + f" {'count':>6}"]
    for g, option in enumerate(mix.options):
        caps = " ".join(f"{mix.capacity[b, g]:>8.2f}/s" for b in range(len(mix.buckets)))
        lines.append(f"{option.name:<14} {option.tp:>3} {option.instance_price:>9.2f} {caps} {mix.counts[g]:>6}")
    lines.append("bucket shares: " + ", ".join(f"{b.input_len}+{b.output_len}: {b.share:.2f}" for b in mix.buckets))
    mixed = ", ".join(f"{n} x {o.name}" for n, o in zip(mix.counts, mix.options, strict=True) if n)
    lines.append(f"cheapest mix ({mix.status}): {mixed or 'none'} = ${mix.cost_per_hour:.2f}/h")
    for name, cost in mix.single_type_costs.items():
        lines.append(f"  {name} alone: " + (f"${cost:.2f}/h" if cost is not None else "cannot meet the SLOs"))
    return "\n".join(lines)
