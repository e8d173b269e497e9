"""Autoscaling policy: how many instances each pool should run (pure logic: no Ray, no I/O,
time passed in). The router's scaling loop (router/scaling.py) and the cluster simulator
(cluster/planner/simulator.py) both ask it.

Each evaluation looks at one pool's observed load over a window (``PoolLoad``) and, when a
capacity model is known (``PoolCapacity``, from a profile), turns it into a *utilization*:
the instances the load needs at 100% divided by the instances the pool has (ready + starting):

    prefill     arrivals/s x mean prompt tokens / prompt tokens/s per instance
    decode      arrivals/s x mean output tokens / output tokens/s per instance at the TPOT target
    colocated   the two time fractions added (one engine does both)

Scale out when any of these holds (each is a *reason*, all are reported):
  * utilization > ``target_utilization``;
  * more than ``max_waiting_per_instance`` requests wait in the pool's engines per instance
    (queueing: the model underestimates, or the profile is off);
  * decode pool: mean freeness < ``min_freeness`` (KV memory is running out).
Scale in when none holds and one instance fewer would still run at or below
``scale_in_utilization``. The band between the two utilizations is the hysteresis: a load in
it changes nothing. On top of that, an action needs ``scale_out_after`` (or
``scale_in_after``) consecutive evaluations that want it, and none is taken within
``cooldown_s`` of the pool's last change or while an earlier one is still under way
(instances starting or draining). Bounds always win: a pool below its minimum grows at once,
one above its maximum shrinks at once. Scale-out may add several instances (what the model
says the load needs); scale-in removes one at a time, the ready instance with the fewest
running requests (the least to migrate; ties: the newest, i.e. the largest id).

Without a capacity model only the queueing and memory signals scale out, and a pool scales
in only when it saw no arrivals and nothing waits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from cluster.config import AutoscalerConfig, PoolBounds

OUT, IN, HOLD = "out", "in", "hold"


@dataclass(frozen=True)
class PoolCapacity:
    """What one instance of a pool sustains, from a profile (cluster/planner/capacity.py)."""

    # Prompt tokens per second (prefill and colocated pools).
    prefill_tokens_per_s: float = 0.0
    # Output tokens per second while keeping the TPOT target (decode and colocated pools).
    decode_tokens_per_s: float = 0.0


class CapacityModel(Protocol):
    """Per-instance capacity of a pool for requests of the given mean lengths (a profile's
    model: cluster/planner/capacity.py; `FixedCapacity` for fixed numbers)."""

    def capacity(self, role: str, mean_prompt_tokens: float, mean_output_tokens: float) -> PoolCapacity | None: ...


@dataclass(frozen=True)
class FixedCapacity:
    """The same capacity whatever the lengths: {role: PoolCapacity}."""

    per_role: dict[str, PoolCapacity]

    def capacity(self, role: str, mean_prompt_tokens: float, mean_output_tokens: float) -> PoolCapacity | None:
        return self.per_role.get(role)


@dataclass(frozen=True)
class TableCapacity:
    """Capacity from a table computed ahead of time from a profile (AutoscalerConfig's
    `capacity_table`, filled by the CLI: the scheduler needs no profile file): rows of
    (role, prompt tokens, output tokens, prompt tokens/s, output tokens/s); a query takes the
    row of its role nearest in log-length."""

    rows: tuple[tuple[str, float, float, float, float], ...]

    def capacity(self, role: str, mean_prompt_tokens: float, mean_output_tokens: float) -> PoolCapacity | None:
        best, best_d = None, math.inf
        p = math.log(max(1.0, mean_prompt_tokens or 256.0))
        o = math.log(max(1.0, mean_output_tokens or 128.0))
        for r, prompt, output, prefill_tps, decode_tps in self.rows:
            if r != role:
                continue
            d = (math.log(prompt) - p) ** 2 + (math.log(output) - o) ** 2
            if d < best_d:
                best, best_d = PoolCapacity(prefill_tps, decode_tps), d
        return best


@dataclass(frozen=True)
class PoolLoad:
    """One pool as observed over the last window."""

    role: str
    ready: int
    starting: int = 0
    draining: int = 0
    # Requests per second that entered this pool, and their mean lengths.
    arrival_rate: float = 0.0
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    # Token rates the pool served, when measured directly (engine counters); None: derived
    # from the arrival rate and the mean lengths.
    prompt_tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    # Requests queued (not running) in the pool's engines now.
    waiting: int = 0
    # Decode pool: mean Llumnix freeness over ready instances (None: unknown).
    mean_freeness: float | None = None
    # (instance id, running requests) of every ready instance: scale-in picks from these.
    instances: tuple[tuple[str, int], ...] = ()

    @property
    def size(self) -> int:
        """Instances that count as capacity: ready and starting (draining ones are leaving)."""
        return self.ready + self.starting


@dataclass(frozen=True)
class ScaleDecision:
    role: str
    action: str  # out | in | hold
    current: int
    target: int
    reason: str
    # Scale-in: the instance to drain and stop.
    instance_id: str | None = None
    utilization: float | None = None
    # What drove it, one word for metrics labels: bounds | utilization | queue | memory | idle
    # (actions); hold for the rest.
    signal: str = "hold"

    @property
    def changes(self) -> bool:
        return self.action != HOLD


def demand_instances(load: PoolLoad, capacity: PoolCapacity | None) -> float | None:
    """Instances the observed load needs at 100% utilization (None: no capacity model)."""
    if capacity is None:
        return None
    prefill = decode = 0.0
    if load.role in ("prefill", "colocated"):
        if capacity.prefill_tokens_per_s <= 0:
            return None
        rate = load.prompt_tokens_per_s
        if rate is None:
            rate = load.arrival_rate * load.mean_prompt_tokens
        prefill = rate / capacity.prefill_tokens_per_s
    if load.role in ("decode", "colocated"):
        if capacity.decode_tokens_per_s <= 0:
            return None
        rate = load.output_tokens_per_s
        if rate is None:
            rate = load.arrival_rate * load.mean_output_tokens
        decode = rate / capacity.decode_tokens_per_s
    return prefill + decode


def scale_in_victim(load: PoolLoad) -> str | None:
    """The ready instance with the fewest running requests; ties go to the newest (the largest
    numeric suffix, then the largest id)."""
    if not load.instances:
        return None

    def key(item: tuple[str, int]) -> tuple:
        instance_id, running = item
        suffix = instance_id.rpartition("-")[2]
        return (-running, int(suffix) if suffix.isdigit() else -1, instance_id)

    return max(load.instances, key=key)[0]


@dataclass
class _PoolState:
    want_out: int = 0
    want_in: int = 0
    last_change: float = -math.inf


@dataclass
class Autoscaler:
    """Stateful only in its hysteresis counters and last-change times; call `evaluate` every
    ``config.interval_s`` with the current loads."""

    config: AutoscalerConfig
    capacity: CapacityModel | None = None
    _pools: dict[str, _PoolState] = field(default_factory=dict)

    def evaluate(self, now: float, loads: list[PoolLoad]) -> list[ScaleDecision]:
        """One decision per pool that has bounds (holds included, each with its reason)."""
        decisions = []
        for load in loads:
            bounds = self.config.bounds_for(load.role)
            if bounds is not None:
                decisions.append(self._decide(now, load, bounds))
        return decisions

    def _decide(self, now: float, load: PoolLoad, bounds: PoolBounds) -> ScaleDecision:
        state = self._pools.setdefault(load.role, _PoolState())
        cfg = self.config
        n = load.size
        capacity = None
        if self.capacity is not None:
            capacity = self.capacity.capacity(load.role, load.mean_prompt_tokens, load.mean_output_tokens)
        demand = demand_instances(load, capacity)
        util = demand / n if demand is not None and n > 0 else None

        def decision(action: str, target: int, reason: str, victim: str | None = None,
                     signal: str = "hold") -> ScaleDecision:
            if action != HOLD:
                state.want_out = state.want_in = 0
                state.last_change = now
            return ScaleDecision(load.role, action, n, target, reason, victim, util, signal)

        if n < bounds.min_instances:
            return decision(OUT, bounds.min_instances, f"{n} instance(s), below the minimum {bounds.min_instances}",
                            signal="bounds")
        if load.ready > bounds.max_instances and load.starting == 0 and load.draining == 0:
            return decision(IN, n - 1, f"{n} instance(s), above the maximum {bounds.max_instances}",
                            scale_in_victim(load), signal="bounds")
        if load.starting or load.draining:
            state.want_out = state.want_in = 0
            return decision(HOLD, n, f"scaling under way ({load.starting} starting, {load.draining} draining)")

        pressure, signals = [], []
        if util is not None and util > cfg.target_utilization:
            pressure.append(f"utilization {util:.2f} > target {cfg.target_utilization:.2f}")
            signals.append("utilization")
        if n > 0 and load.waiting > cfg.max_waiting_per_instance * n:
            pressure.append(f"{load.waiting} request(s) waiting (> {cfg.max_waiting_per_instance:g} per instance)")
            signals.append("queue")
        if (load.role == "decode" and load.mean_freeness is not None
                and load.mean_freeness < cfg.min_freeness):
            pressure.append(f"mean freeness {load.mean_freeness:.2f} < {cfg.min_freeness:g} (KV memory)")
            signals.append("memory")

        cooling = now - state.last_change < cfg.cooldown_s
        cool_note = f"cool-down, {cfg.cooldown_s - (now - state.last_change):.0f}s left"

        if pressure:
            state.want_in = 0
            reason = "; ".join(pressure)
            if n >= bounds.max_instances:
                state.want_out = 0
                return decision(HOLD, n, f"{reason}; already at the maximum {bounds.max_instances}")
            state.want_out += 1
            if state.want_out < cfg.scale_out_after:
                return decision(HOLD, n, f"{reason} ({state.want_out}/{cfg.scale_out_after} evaluations)")
            if cooling:
                return decision(HOLD, n, f"{reason}; {cool_note}")
            target = n + 1
            if demand is not None:
                target = max(target, math.ceil(demand / cfg.target_utilization))
            return decision(OUT, min(bounds.max_instances, target), reason, signal=signals[0])

        state.want_out = 0
        if n <= bounds.min_instances:
            state.want_in = 0
            return decision(HOLD, n, "within the band" if util is not None else "no pressure")
        if demand is not None:
            after = demand / (n - 1)
            if after > cfg.scale_in_utilization:
                state.want_in = 0
                return decision(HOLD, n, f"utilization {util:.2f}: within the band (with one instance "
                                         f"fewer {after:.2f} > {cfg.scale_in_utilization:.2f})")
            reason = (f"utilization {util:.2f}; with {n - 1} instance(s) {after:.2f} <= "
                      f"{cfg.scale_in_utilization:.2f}")
            signal = "utilization"
        else:
            if load.arrival_rate > 0 or load.waiting > 0 or (load.output_tokens_per_s or 0) > 0 \
                    or (load.prompt_tokens_per_s or 0) > 0:
                state.want_in = 0
                return decision(HOLD, n, "no capacity model: scales in only when idle")
            reason = "idle: no arrivals in the window and nothing waiting"
            signal = "idle"
        state.want_in += 1
        if state.want_in < cfg.scale_in_after:
            return decision(HOLD, n, f"{reason} ({state.want_in}/{cfg.scale_in_after} evaluations)")
        if cooling:
            return decision(HOLD, n, f"{reason}; {cool_note}")
        victim = scale_in_victim(load)
        if victim is None:
            return decision(HOLD, n, f"{reason}; no ready instance to remove")
        return decision(IN, n - 1, reason, victim, signal)
