"""`disagg-serve up`'s autoscaler flags (and `autoscaler:` YAML section) and the typed
AutoscalerConfig they build. The policy is router/autoscaler.py; the loop that acts on it is
router/scaling.py."""

from __future__ import annotations

import argparse

from cluster.config import AUTOSCALE_ROLES, AutoscalerConfig, PoolBounds, PoolConfig

_DEFAULTS = AutoscalerConfig()

# (flag, AutoscalerConfig field, type, help); defaults come from AutoscalerConfig itself.
AUTOSCALER_FLAGS = (
    ("--autoscale-interval-s", "interval_s", float, "seconds between autoscaler evaluations"),
    ("--autoscale-window-s", "window_s", float, "arrivals and lengths are averaged over this window, s"),
    ("--autoscale-target-utilization", "target_utilization", float,
     "scale out above this fraction of the pool's capacity (profile's capacity model)"),
    ("--autoscale-scale-in-utilization", "scale_in_utilization", float,
     "scale in when one instance fewer would run at or below this fraction (hysteresis band)"),
    ("--autoscale-out-after", "scale_out_after", int, "consecutive evaluations wanting more before acting"),
    ("--autoscale-in-after", "scale_in_after", int, "consecutive evaluations wanting fewer before acting"),
    ("--autoscale-cooldown-s", "cooldown_s", float, "no further change to a pool this long after one, s"),
    ("--autoscale-max-waiting", "max_waiting_per_instance", float,
     "more requests waiting than this per instance means scale out"),
    ("--autoscale-min-freeness", "min_freeness", float,
     "decode pool: mean freeness (free KV blocks per running request) below this means scale out"),
    ("--autoscale-drain-timeout-s", "drain_timeout_s", float, "deadline for draining an instance on scale-in, s"),
)


def add_autoscaler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("autoscaling (pool sizes follow the load)")
    g.add_argument("--autoscale", action=argparse.BooleanOptionalAction, default=_DEFAULTS.enabled,
                   help="resize pools between --ROLE-min and --ROLE-max from observed load")
    for role in AUTOSCALE_ROLES:
        g.add_argument(f"--{role}-min", type=int, default=None, metavar="N",
                       help=f"fewest {role} instances (default 1 when --{role}-max is given)")
        g.add_argument(f"--{role}-max", type=int, default=None, metavar="N",
                       help=f"most {role} instances (default: the starting count)")
    g.add_argument("--autoscale-profile", default=None, metavar="FILE",
                   help="profile (`disagg-serve profile`) whose capacity model turns load into utilization; "
                        "without one only queueing and KV memory pressure scale out")
    g.add_argument("--autoscale-slo-tpot-ms", type=float, default=None,
                   help="TPOT target the decode capacity is computed at (default 100)")
    for flag, name, kind, text in AUTOSCALER_FLAGS:
        g.add_argument(flag, dest=flag[2:].replace("-", "_"), type=kind, default=getattr(_DEFAULTS, name),
                       help=text)


def _int(value, flag: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).lstrip("-").isdigit():
        raise SystemExit(f"error: {flag} must be an integer, got {value!r}")
    return int(value)


def _number(value, kind: type, flag: str):
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SystemExit(f"error: {flag} must be a number, got {value!r}")
    try:
        number = kind(value)
    except ValueError:
        raise SystemExit(f"error: {flag} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}") from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise SystemExit(f"error: {flag} must be an integer, got {value!r}")
    return number


def autoscaler_config_from_args(args, pools: tuple[PoolConfig, ...]) -> AutoscalerConfig:
    """Bounds for every pool that has --ROLE-min or --ROLE-max; the starting count must lie
    within them. A pool of the other mode (colocated vs disaggregated) cannot have bounds."""
    if not isinstance(args.autoscale, bool):
        raise SystemExit(f"error: autoscale must be true or false, got {args.autoscale!r}")
    start = {p.role: p.num_instances for p in pools}
    bounds = []
    for role in AUTOSCALE_ROLES:
        low = _int(getattr(args, f"{role}_min"), f"--{role}-min")
        high = _int(getattr(args, f"{role}_max"), f"--{role}-max")
        if low is None and high is None:
            continue
        if role not in start:
            raise SystemExit(f"error: --{role}-min/--{role}-max given, but this cluster has no {role} pool")
        low = 1 if low is None else low
        high = max(start[role], low) if high is None else high
        try:
            b = PoolBounds(role, low, high)
        except ValueError as exc:
            raise SystemExit(f"error: autoscaler: {exc}") from exc
        if not b.min_instances <= start[role] <= b.max_instances:
            raise SystemExit(f"error: the {role} pool starts with {start[role]} instance(s), outside "
                             f"--{role}-min {b.min_instances} / --{role}-max {b.max_instances}")
        bounds.append(b)
    if args.autoscale and not bounds:
        raise SystemExit("error: --autoscale needs bounds for at least one pool (e.g. --decode-min 1 --decode-max 4)")
    fields = {name: _number(getattr(args, flag[2:].replace("-", "_")), kind, flag)
              for flag, name, kind, _ in AUTOSCALER_FLAGS}
    slo = args.autoscale_slo_tpot_ms
    slo = None if slo is None else _number(slo, float, "--autoscale-slo-tpot-ms")
    table = ()
    if args.autoscale_profile:
        table = _capacity_table(args.autoscale_profile, pools, slo)
    try:
        return AutoscalerConfig(enabled=args.autoscale, bounds=tuple(bounds), profile=args.autoscale_profile,
                                slo_tpot_ms=slo, capacity_table=table, **fields)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def _capacity_table(ref: str, pools: tuple[PoolConfig, ...], slo_tpot_ms: float | None) -> tuple:
    """The profile's capacity model as the table the scheduler carries (no file needed there)."""
    from cluster.planner.capacity import DEFAULT_TPOT_S, capacity_table
    from cluster.planner.commands import load_profile

    try:
        profile = load_profile(ref)
    except ValueError as exc:
        raise SystemExit(f"error: --autoscale-profile: {exc}") from exc
    tp = {p.role: getattr(p, "tensor_parallel_size", 1) for p in pools}
    missing = sorted({t for t in tp.values() if t not in profile.parallel})
    if missing:
        raise SystemExit(f"error: --autoscale-profile {ref} has no TP degree {missing} (has {profile.tp_degrees})")
    tpot_s = slo_tpot_ms / 1000 if slo_tpot_ms else DEFAULT_TPOT_S
    return capacity_table(profile, tp, tpot_s, tuple(tp))
