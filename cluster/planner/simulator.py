"""A discrete-event simulator of the serving cluster, driven by the router's own policy code.

What is real and what is modelled:

* **Policies: the router's, called, not copied.** Colocated placement `dispatcher.least_loaded`,
  prefill placement `dispatcher.fewest_queued_prompt_tokens`, decode placement Llumnix
  `freeness.pick_dispatch` (falling back to `dispatcher.freest` when nothing fits, as
  `Router._pick_decode` does), migration `freeness.pair_migrations` + `freeness.select_request`
  every `migration_interval_s`, admission control at `max_in_flight`, and pool sizes from
  `router.autoscaler.Autoscaler`. The modules are called through their module objects, so a
  test that patches `router.freeness.pick_dispatch` sees every call.
* **Engines: simulated vLLM schedulers** (sim_engine.py): chunked prefill, the token budget,
  KV blocks, preemption, head-of-line blocking, held prefill KV, remote-KV admission.
* **Time: from a profile.** Each step costs the profile's step-cost model for what it computes;
  KV moves at the profile's bandwidth; engines that share a host slow each other down by the
  profile's contention factor, simulated as processor sharing (a step in progress is
  re-timed whenever the number of busy engines on its host changes); the router path adds the
  profile's fixed overheads (dispatch, emit, hand-off).
* **Workloads: the bench's generators** (`cluster.bench.workload.arrival_offsets`,
  `sample_lengths`, seeded like `disagg-serve bench`), and **metrics: the bench's math**
  (`cluster.bench.records.build_result`): the simulator writes one `RequestRecord` per request,
  exactly as the client-side recorder would have.

The router's own bookkeeping is mirrored where the policies read it: requests in flight per
instance (placed and not ended) and the prompt tokens queued per prefill instance.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cluster.bench import records as bench_records
from cluster.bench.records import BenchResult, RequestRecord
from cluster.bench.workload import arrival_offsets, sample_lengths
from cluster.config import AutoscalerConfig, FreenessConfig
from cluster.planner.profile import Profile
from cluster.planner.sim_engine import EngineLoad, SimEngine, SimSeq, StepPlan
from router import autoscaler as scaling
from router import dispatcher, freeness

ROLES = ("colocated", "prefill", "decode")
# The window over which a host's streamed-token rate (the router's CPU load) is measured.
_TOKEN_WINDOW_S = 0.5


@dataclass(frozen=True)
class ClusterShape:
    """How many instances of each role, and each role's tensor-parallel degree."""

    colocated: int = 0
    prefill: int = 0
    decode: int = 0
    colocated_tp: int = 1
    prefill_tp: int = 1
    decode_tp: int = 1

    def __post_init__(self) -> None:
        if (self.prefill > 0) != (self.decode > 0):
            raise ValueError("a disaggregated shape needs both prefill and decode instances")
        if self.colocated and self.prefill:
            raise ValueError("a shape is colocated or disaggregated, not both")
        if not (self.colocated or self.prefill):
            raise ValueError("a shape needs at least one instance")

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0

    def count(self, role: str) -> int:
        return getattr(self, role)

    def tp(self, role: str) -> int:
        return getattr(self, f"{role}_tp")

    @property
    def gpus(self) -> int:
        return sum(self.count(r) * self.tp(r) for r in ROLES)

    @property
    def label(self) -> str:
        if self.disaggregated:
            return (f"{self.prefill}P(tp{self.prefill_tp})+{self.decode}D(tp{self.decode_tp})"
                    if (self.prefill_tp, self.decode_tp) != (1, 1) else f"{self.prefill}P+{self.decode}D")
        return f"{self.colocated}C(tp{self.colocated_tp})" if self.colocated_tp != 1 else f"colocated-{self.colocated}"


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    priority: int = 0


def make_workload(num: int, rate: float, input_len: int, output_len: int, input_len_range: float = 0.0,
                  output_len_range: float = 0.0, burstiness: float = 1.0, seed: int = 0) -> list[SimRequest]:
    """The requests `disagg-serve bench` would send with the same flags: lengths drawn from
    one generator seeded with `seed` (inputs, then outputs), arrivals from arrival_offsets."""
    rng = np.random.default_rng(seed)
    inputs = sample_lengths(num, input_len, input_len_range, rng)
    outputs = sample_lengths(num, output_len, output_len_range, rng)
    offsets = arrival_offsets(num, rate, burstiness, seed)
    return [SimRequest(float(t), int(i), int(o)) for t, i, o in zip(offsets, inputs, outputs, strict=True)]


@dataclass(frozen=True)
class SimOptions:
    freeness: FreenessConfig = field(default_factory=FreenessConfig)
    migration: bool = True
    migration_interval_s: float = 0.5
    max_in_flight: int = 512
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    # Keep every token's time (ITL); off: only the first and last (TTFT, TPOT, E2E are exact).
    record_tokens: bool = True
    # Engines on one host slow each other down (the profile's contention); off: none do.
    contention: bool = True
    autoscaler: AutoscalerConfig | None = None
    capacity: scaling.CapacityModel | None = None
    # Engine limits (None: the profile's).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # Requests not done this long after the last arrival end as UNFINISHED (overload).
    drain_limit_s: float = 300.0
    # Time every placement decision (policy + building its views) with perf_counter.
    time_decisions: bool = False
    # Stop as soon as more than this many requests missed an SLO (a search that only needs to
    # know whether an attainment target is met); the rest end UNFINISHED.
    stop_after_misses: int | None = None
    label: str = ""


@dataclass(frozen=True)
class _Settings:
    """What bench_records.build_result reads from a run's configuration."""

    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    label: str
    ignore_eos: bool = True

    def display_label(self) -> str:
        return self.label


@dataclass
class SimResult:
    shape: ClusterShape
    result: BenchResult
    decisions: list[tuple[float, scaling.ScaleDecision]]
    pool_sizes: list[tuple[float, str, int]]
    migrations: int
    preemptions: int
    steps: int
    # Per role: seconds each placement decision took (SimOptions.time_decisions).
    decision_seconds: dict[str, list[float]]
    wall_s: float
    stopped_early: bool = False

    @property
    def attainment(self) -> float:
        """Fraction of all requests (failed ones included) that completed within every SLO."""
        total = len(self.result.records)
        if total == 0:
            return 0.0
        cfg = self.result.config
        good = sum(bench_records.meets_slo(r.ttft_s and r.ttft_s * 1000, r.tpot_s and r.tpot_s * 1000,
                                           cfg.get("slo_ttft_ms"), cfg.get("slo_tpot_ms"))
                   for r in self.result.records if r.ok)
        return good / total


# ---------------------------------------------------------------- instances and hosts


@dataclass(eq=False)
class _Instance:
    instance_id: str
    role: str
    tp: int
    engine: SimEngine
    cost: object
    host: int
    state: str = "ready"  # starting | ready | draining | stopped
    in_flight: set = field(default_factory=set)
    queued_prompt_tokens: int = 0
    migrating: bool = False
    # The step in progress (None: idle).
    plan: StepPlan | None = None
    work_left: float = 0.0
    rate: float = 1.0
    last_update: float = 0.0
    version: int = 0
    steps: int = 0
    # Migrations waiting for the step in progress to end before they stop the request here.
    stops: list = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def serving(self) -> bool:
        return self.state in ("ready", "draining")


@dataclass
class _Request:
    index: int
    spec: SimRequest
    record: RequestRecord
    phase: str = "queued"
    instance: _Instance | None = None
    seq: SimSeq | None = None
    generated: int = 0
    prefill_instance: _Instance | None = None
    migrating: bool = False
    missed: bool = False


class Simulator:
    def __init__(self, profile: Profile, shape: ClusterShape, options: SimOptions | None = None):
        self.profile = profile
        self.shape = shape
        self.options = options or SimOptions()
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.instances: dict[str, _Instance] = {}
        # Per host, the engines computing a step now (a dict: insertion order keeps runs deterministic).
        self._host_busy: dict[int, dict] = {}
        self._next_index: dict[str, int] = dict.fromkeys(ROLES, 0)
        self.requests: list[_Request] = []
        self.by_id: dict[str, _Request] = {}
        self.in_flight = 0
        self.migrations = 0
        self.decisions: list[tuple[float, scaling.ScaleDecision]] = []
        self.pool_sizes: list[tuple[float, str, int]] = []
        self.decision_seconds: dict[str, list[float]] = {}
        self._pending_arrivals = 0
        self.misses = 0
        self.stopped_early = False
        self._arrivals: deque = deque()  # (time, prompt, output) for the autoscaler's window
        # Per host, (time, tokens) of recent steps: the serving path's CPU load follows them.
        self._host_tokens: dict[int, deque] = {}
        self.autoscaler = (scaling.Autoscaler(self.options.autoscaler, self.options.capacity)
                           if self.options.autoscaler is not None and self.options.autoscaler.enabled else None)
        for role in ROLES:
            for _ in range(shape.count(role)):
                self._new_instance(role, "ready")

    # ---- events ----
    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def _record_sizes(self) -> None:
        for role in ROLES:
            n = sum(1 for i in self.instances.values() if i.role == role and i.state in ("ready", "draining"))
            if n or self.shape.count(role):
                self.pool_sizes.append((self.now, role, n))

    # ---- instances ----
    def _new_instance(self, role: str, state: str) -> _Instance:
        index = self._next_index[role]
        self._next_index[role] += 1
        tp = self.shape.tp(role)
        par = self.profile.at(tp)
        engine = SimEngine(par.num_kv_blocks, self.profile.block_size,
                           self.options.max_num_batched_tokens or self.profile.max_num_batched_tokens,
                           self.options.max_num_seqs or self.profile.max_num_seqs)
        per_host = self.profile.contention.engines_per_host
        host = len(self.instances) // per_host if per_host else 0
        inst = _Instance(f"{role}-{index}", role, tp, engine, par.cost, host, state=state)
        self.instances[inst.instance_id] = inst
        return inst

    def _slowdown(self, host: int, busy: int) -> float:
        if not self.options.contention:
            return 1.0
        contention = self.profile.contention
        router_load = 0.0
        if contention.router_cpu_per_token_s:
            window = self._host_tokens.get(host)
            while window and window[0][0] < self.now - _TOKEN_WINDOW_S:
                window.popleft()
            tokens = sum(n for _, n in window) if window else 0
            router_load = contention.router_cpu_per_token_s * tokens / _TOKEN_WINDOW_S
        return contention.slowdown(busy, router_load)

    def _shares_host(self) -> bool:
        return self.options.contention and self.profile.contention.shared

    def _retime_host(self, host: int) -> None:
        """Processor sharing: every busy engine on the host runs at 1/slowdown(busy). Work done
        so far is booked at the old rate before the new one applies."""
        busy = self._host_busy.setdefault(host, {})
        rate = 1.0 / self._slowdown(host, len(busy))
        for inst in busy:
            inst.work_left -= (self.now - inst.last_update) * inst.rate
            inst.last_update = self.now
            inst.rate = rate
            inst.version += 1
            self._at(self.now + max(0.0, inst.work_left) / rate, self._step_done, inst, inst.version)

    def _kick(self, inst: _Instance) -> None:
        """Starts a step if the engine is idle and has something to compute."""
        if inst.plan is not None or inst.state in ("starting", "stopped"):
            return
        self._start_remote_loads(inst)
        if not inst.engine.has_work():
            return
        plan = inst.engine.schedule()
        if plan.empty:
            return
        inst.plan = plan
        overheads = self.profile.overheads
        inst.work_left = (inst.cost.step_seconds(plan.prefill_tokens, plan.prefill_seqs, plan.decode_seqs,
                                                 plan.decode_context, plan.prefill_attention)
                          + overheads.step_s + overheads.per_token_s * plan.samples)
        inst.last_update, inst.rate = self.now, 1.0
        if self._shares_host():
            self._host_busy.setdefault(inst.host, {})[inst] = None
            self._retime_host(inst.host)
        else:
            inst.version += 1
            self._at(self.now + inst.work_left, self._step_done, inst, inst.version)

    def _step_done(self, inst: _Instance, version: int) -> None:
        if version != inst.version or inst.plan is None:
            return  # re-timed since
        plan, inst.plan = inst.plan, None
        inst.steps += 1
        inst.version += 1
        if self._shares_host():
            self._host_busy[inst.host].pop(inst, None)
            if plan.samples:
                self._host_tokens.setdefault(inst.host, deque()).append((self.now, plan.samples))
            self._retime_host(inst.host)
        for seq in inst.engine.complete(plan):
            self._token(inst, seq)
        stops, inst.stops = inst.stops, []
        for req, dst in stops:
            self._migration_commit(req, inst, dst)
        self._kick(inst)
        self._maybe_stop(inst)

    def _start_remote_loads(self, inst: _Instance) -> None:
        for seq in inst.engine.admit_remote():
            req = self.by_id[seq.request_id]
            prompt_tokens = seq.num_tokens - 1
            self._at(self.now + self.profile.kv_transfer_seconds(prompt_tokens), self._kv_arrived, inst, seq, req)

    def _kv_arrived(self, inst: _Instance, seq: SimSeq, req: _Request) -> None:
        inst.engine.kv_arrived(seq)
        src = req.prefill_instance
        if src is not None:
            src.engine.release_hold(seq.request_id)
            self._kick(src)
            self._maybe_stop(src)
            req.prefill_instance = None
        self._kick(inst)

    # ---- requests ----
    def _arrive(self, req: _Request) -> None:
        self._arrivals.append((self.now, req.spec.prompt_len, req.spec.output_len))
        if self.in_flight >= self.options.max_in_flight:
            self.in_flight += 1  # _fail takes it back
            self._fail(req, "RESOURCE_EXHAUSTED")
            return
        self.in_flight += 1
        req.record.status = "OK"
        self._place(req)

    def _timed(self, role: str, fn, *args):
        if not self.options.time_decisions:
            return fn(*args)
        start = time.perf_counter()
        out = fn(*args)
        self.decision_seconds.setdefault(role, []).append(time.perf_counter() - start)
        return out

    def _candidates(self, role: str) -> list[dispatcher.Candidate]:
        return [dispatcher.Candidate(i.instance_id, len(i.in_flight), i.engine.free_blocks, i.queued_prompt_tokens)
                for i in self.instances.values() if i.role == role and i.ready]

    def _pick(self, role: str, policy) -> _Instance | None:
        chosen = policy(self._candidates(role))
        return self.instances[chosen] if chosen is not None else None

    def _place(self, req: _Request) -> None:
        spec = req.spec
        if self.shape.disaggregated and spec.output_len > 1:
            inst = self._timed("prefill", self._pick, "prefill", dispatcher.fewest_queued_prompt_tokens)
            phase = "prefill"
        else:
            role = "prefill" if self.shape.disaggregated else "colocated"
            inst = self._timed(role, self._pick, role, dispatcher.least_loaded)
            phase = "single"
        if inst is None:
            self._fail(req, "UNAVAILABLE")
            return
        max_new = 1 if phase == "prefill" else spec.output_len
        seq = SimSeq(f"r{req.index}", spec.prompt_len, max_new, spec.priority, spec.arrival_s,
                     held=phase == "prefill")
        req.phase, req.instance, req.seq = phase, inst, seq
        inst.in_flight.add(req.index)
        if phase == "prefill":
            inst.queued_prompt_tokens += spec.prompt_len
        req.record.served_by.append(inst.instance_id)
        self._at(self.now + self.profile.overheads.dispatch_s, self._engine_add, inst, seq)

    def _engine_add(self, inst: _Instance, seq: SimSeq) -> None:
        inst.engine.add(seq)
        self._kick(inst)

    def _missed(self) -> None:
        self.misses += 1
        limit = self.options.stop_after_misses
        if limit is not None and self.misses > limit and not self.stopped_early:
            self.stopped_early = True
            self._events.clear()

    def _fail(self, req: _Request, status: str) -> None:
        if not req.missed:
            req.missed = True
            self._missed()
        req.record.status = status
        req.record.done_s = self.now
        self.in_flight -= 1

    def _token(self, inst: _Instance, seq: SimSeq) -> None:
        req = self.by_id[seq.request_id]
        if req.instance is not inst:
            return
        t = self.now + self.profile.overheads.emit_s
        req.generated += 1
        rec = req.record
        if req.generated == 1:
            ttft_ms = (t - req.spec.arrival_s) * 1000
            if self.options.slo_ttft_ms is not None and ttft_ms > self.options.slo_ttft_ms:
                req.missed = True
                self._missed()
        if self.options.record_tokens or req.generated == 1:
            rec.chunk_times.append(t)
            rec.chunk_tokens.append(1)
        elif len(rec.chunk_times) == 1:
            rec.chunk_times.append(t)
            rec.chunk_tokens.append(1)
        else:
            rec.chunk_times[-1] = t
            rec.chunk_tokens[-1] += 1
        if req.generated >= req.spec.output_len:
            self._finish(req, inst, t)
        elif req.phase == "prefill" and seq.done:
            self._at(t, self._handoff, req, inst)

    def _finish(self, req: _Request, inst: _Instance, t: float) -> None:
        rec = req.record
        rec.end_s = rec.done_s = t
        rec.prompt_tokens = req.spec.prompt_len
        rec.output_tokens = req.generated
        rec.finish_reason = "length"
        if not req.missed and self.options.slo_tpot_ms is not None and rec.tpot_s is not None \
                and rec.tpot_s * 1000 > self.options.slo_tpot_ms:
            req.missed = True
            self._missed()
        self._leave(inst, req)
        self.in_flight -= 1
        req.phase = "done"

    def _leave(self, inst: _Instance, req: _Request) -> None:
        inst.in_flight.discard(req.index)
        if req.phase == "prefill":
            inst.queued_prompt_tokens -= req.spec.prompt_len

    def _decode_view(self, inst: _Instance) -> freeness.InstanceView:
        engine = inst.engine
        head = engine.blocks_for(engine.waiting[0].num_tokens) if engine.waiting else 0
        load = EngineLoad(engine.num_blocks, engine.free_blocks, len(engine.running), len(engine.waiting), 0, head)
        high = 0
        if self.options.freeness.high_priority_headroom_blocks:
            high = sum(1 for s in inst.engine.running
                       if freeness.is_high_priority(s.priority, self.options.freeness))
        return freeness.InstanceView(
            instance_id=inst.instance_id, num_total_blocks=load.num_total_blocks,
            num_free_blocks=min(load.num_free_blocks, load.num_total_blocks),
            num_running=max(load.num_running, len(inst.in_flight)), num_waiting=load.num_waiting,
            head_waiting_blocks=load.head_waiting_blocks, draining=inst.state == "draining",
            high_priority_running=high, migrating=inst.migrating)

    def _pick_decode(self, num_tokens: int, priority: int) -> _Instance | None:
        ready = [i for i in self.instances.values() if i.role == "decode" and i.ready]
        if ready:
            views = [self._decode_view(i) for i in ready]
            needed = math.ceil(num_tokens / self.profile.block_size)
            chosen = freeness.pick_dispatch(views, self.options.freeness, needed, priority)
            if chosen is not None:
                return self.instances[chosen]
        return self._pick("decode", dispatcher.freest)

    def _handoff(self, req: _Request, src: _Instance) -> None:
        spec = req.spec
        target = self._timed("decode", self._pick_decode, spec.prompt_len + 1, spec.priority)
        if target is None:
            src.engine.release_hold(req.seq.request_id)
            self._leave(src, req)
            self._fail(req, "UNAVAILABLE")
            return
        self._leave(src, req)
        req.prefill_instance = src
        seq = SimSeq(req.seq.request_id, spec.prompt_len + 1, spec.output_len - 1, spec.priority, spec.arrival_s)
        req.phase, req.instance, req.seq = "decode", target, seq
        target.in_flight.add(req.index)
        req.record.served_by.append(target.instance_id)
        self._at(self.now + self.profile.overheads.handoff_s, self._decode_add, target, seq)

    def _decode_add(self, inst: _Instance, seq: SimSeq) -> None:
        inst.engine.add_remote(seq)
        self._kick(inst)

    # ---- migration (Llumnix) ----
    def _migration_tick(self) -> None:
        self._drain_once()
        if self.options.migration:
            self._balance_once()
        if self._active():
            self._at(self.now + self.options.migration_interval_s, self._migration_tick)

    def _balance_once(self) -> None:
        decode = [i for i in self.instances.values() if i.role == "decode" and i.serving]
        if len(decode) < 2:
            return
        views = {i.instance_id: self._decode_view(i) for i in decode}
        cfg = self.options.freeness
        for src_id, dst_id in freeness.pair_migrations(list(views.values()), cfg):
            src, dst = self.instances[src_id], self.instances[dst_id]
            candidates = []
            for seq in src.engine.running:
                req = self.by_id[seq.request_id]
                if req.migrating or req.phase != "decode" or seq.prefilling or seq.done:
                    continue
                candidates.append(freeness.RequestView(
                    seq.request_id, src_id, math.ceil((seq.num_tokens + 1) / self.profile.block_size),
                    seq.num_tokens, seq.priority, self.now - seq.arrival_s))
            chosen = freeness.select_request(candidates, cfg, freeness.available_blocks(views[dst_id], cfg),
                                             source_draining=views[src_id].draining)
            if chosen is None:
                continue
            self._start_migration(self.by_id[chosen.request_id], src, dst, chosen.num_tokens)

    def _drain_once(self) -> None:
        """Like Router.drain: each draining decode instance moves one running request at a
        time to the instance `pick_dispatch` chooses among the others."""
        for src in [i for i in self.instances.values() if i.role == "decode" and i.state == "draining"]:
            if src.migrating:
                continue
            for seq in sorted(src.engine.running, key=lambda s: s.request_id):
                req = self.by_id[seq.request_id]
                if req.migrating or req.phase != "decode" or seq.prefilling or seq.done:
                    continue
                views = [self._decode_view(i) for i in self.instances.values()
                         if i.role == "decode" and i.serving and i is not src and not i.migrating]
                needed = math.ceil((seq.num_tokens + 1) / self.profile.block_size)
                chosen = freeness.pick_dispatch(views, self.options.freeness, needed, seq.priority)
                if chosen is not None:
                    self._start_migration(req, src, self.instances[chosen], seq.num_tokens)
                break

    def _start_migration(self, req: _Request, src: _Instance, dst: _Instance, num_tokens: int) -> None:
        req.migrating = True
        src.migrating = dst.migrating = True
        # Pre-copy runs beside decoding; the stop-and-copy at the end is one more transfer.
        copy_s = self.profile.kv_transfer_seconds(num_tokens) + self.profile.kv_latency_s
        self._at(self.now + copy_s, self._migration_commit, req, src, dst)

    def _migration_commit(self, req: _Request, src: _Instance, dst: _Instance) -> None:
        src.migrating = dst.migrating = False
        req.migrating = False
        seq = req.seq
        if req.instance is not src or req.phase != "decode" or seq not in src.engine.running or seq.prefilling:
            return  # finished or preempted meanwhile: the migration aborts, the request stays
        if src.plan is not None and any(s is seq for s, _ in src.plan.work):
            # Mid-step on the source: the stop happens at the step boundary (as the source's
            # engine thread does it between steps).
            src.migrating = dst.migrating = req.migrating = True
            src.stops.append((req, dst))
            return
        if dst.state != "ready" or not dst.engine.adopt_running(_moved(seq)):
            return
        moved = dst.engine.running[-1]
        src.engine.remove(seq.request_id)
        req.seq = moved
        req.instance = dst
        src.in_flight.discard(req.index)
        dst.in_flight.add(req.index)
        req.record.served_by.append(dst.instance_id)
        self.migrations += 1
        self._kick(dst)
        self._kick(src)
        self._maybe_stop(src)

    # ---- autoscaling ----
    def _pool_load(self, role: str) -> scaling.PoolLoad:
        members = [i for i in self.instances.values() if i.role == role]
        window = self.options.autoscaler.window_s
        while self._arrivals and self._arrivals[0][0] < self.now - window:
            self._arrivals.popleft()
        n = len(self._arrivals)
        span = min(window, self.now) if self.now > 0 else window
        ready = [i for i in members if i.ready]
        mean_freeness = None
        if role == "decode" and ready:
            mean_freeness = float(np.mean([freeness.freeness(self._decode_view(i), self.options.freeness)
                                           for i in ready]))
        return scaling.PoolLoad(
            role=role, ready=len(ready), starting=sum(1 for i in members if i.state == "starting"),
            draining=sum(1 for i in members if i.state == "draining"),
            arrival_rate=n / span if span > 0 else 0.0,
            mean_prompt_tokens=float(np.mean([a[1] for a in self._arrivals])) if n else 0.0,
            mean_output_tokens=float(np.mean([a[2] for a in self._arrivals])) if n else 0.0,
            waiting=sum(len(i.engine.waiting) for i in ready),
            mean_freeness=mean_freeness,
            instances=tuple((i.instance_id, len(i.in_flight)) for i in ready))

    def _autoscale_tick(self) -> None:
        roles = [r for r in ROLES if self.shape.count(r) or self.options.autoscaler.bounds_for(r)]
        roles = [r for r in roles if (r in ("prefill", "decode")) == self.shape.disaggregated]
        for decision in self.autoscaler.evaluate(self.now, [self._pool_load(r) for r in roles]):
            self.decisions.append((self.now, decision))
            if decision.action == scaling.OUT:
                current = decision.current
                for _ in range(decision.target - current):
                    inst = self._new_instance(decision.role, "starting")
                    self._at(self.now + self.profile.overheads.startup_s, self._instance_ready, inst)
            elif decision.action == scaling.IN and decision.instance_id:
                inst = self.instances[decision.instance_id]
                inst.state = "draining"
                self._maybe_stop(inst)
        self._record_sizes()
        if self._active():
            self._at(self.now + self.options.autoscaler.interval_s, self._autoscale_tick)

    def _instance_ready(self, inst: _Instance) -> None:
        inst.state = "ready"
        self._record_sizes()

    def _maybe_stop(self, inst: _Instance) -> None:
        if inst.state != "draining" or inst.in_flight or inst.engine.held or inst.plan is not None:
            return
        if inst.engine.running or inst.engine.waiting:
            return
        inst.state = "stopped"
        self._record_sizes()

    # ---- running ----
    def _active(self) -> bool:
        return self._pending_arrivals > 0 or self.in_flight > 0

    def run(self, requests: list[SimRequest]) -> SimResult:
        started = time.perf_counter()
        for index, spec in enumerate(sorted(requests, key=lambda r: r.arrival_s)):
            rec = RequestRecord(index, spec.prompt_len, spec.output_len, status="PENDING",
                                scheduled_s=spec.arrival_s, send_s=spec.arrival_s)
            req = _Request(index, spec, rec)
            self.requests.append(req)
            self.by_id[f"r{index}"] = req
            self._at(spec.arrival_s, self._arrive_tracked, req)
        self._pending_arrivals = len(self.requests)
        self._record_sizes()
        if self.shape.count("decode") and (self.options.migration or self.autoscaler is not None):
            self._at(self.options.migration_interval_s, self._migration_tick)
        if self.autoscaler is not None:
            self._at(self.options.autoscaler.interval_s, self._autoscale_tick)
        last_arrival = max((r.arrival_s for r in requests), default=0.0)
        limit = last_arrival + self.options.drain_limit_s
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            if t > limit:
                break
            self.now = t
            fn(*args)
        for req in self.requests:
            if req.record.status in ("OK", "PENDING") and req.record.end_s is None:
                req.record.status = "UNFINISHED"
        records = [r.record for r in self.requests]
        ends = [r.done_s for r in records if r.done_s is not None]
        duration = max(ends) if ends else 0.0
        settings = _Settings(self.options.slo_ttft_ms, self.options.slo_tpot_ms,
                             self.options.label or self.shape.label)
        result = bench_records.build_result(settings, self.profile.model.get("name", ""), records, duration)
        return SimResult(self.shape, result, self.decisions, self.pool_sizes, self.migrations,
                         sum(i.engine.preemptions for i in self.instances.values()),
                         sum(i.steps for i in self.instances.values()), self.decision_seconds,
                         time.perf_counter() - started, self.stopped_early)

    def _arrive_tracked(self, req: _Request) -> None:
        self._pending_arrivals -= 1
        self._arrive(req)


def _moved(seq: SimSeq) -> SimSeq:
    """The request as the migration destination adopts it: every token so far is known and
    computed but the last sampled one (vLLM computes only that one at commit)."""
    return SimSeq(seq.request_id, seq.num_tokens, seq.max_new_tokens - seq.generated, seq.priority,
                  seq.arrival_s, computed=seq.num_tokens - 1)


def simulate(profile: Profile, shape: ClusterShape, requests: list[SimRequest],
             options: SimOptions | None = None) -> SimResult:
    return Simulator(profile, shape, options).run(requests)
