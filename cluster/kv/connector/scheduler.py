"""The scheduler side of our KV connector: one `KVScheduler` per engine, in the worker actor's
process next to vLLM's scheduler (the engine core runs in-process).

It decides; the ranks move bytes (cluster/kv/connector/worker.py). It keeps:
- holds: blocks this engine keeps allocated for a peer to pull (a finished prefill's KV, via
  vLLM's delayed free; a live migration's stage view or stopped tail), with deadlines;
- expected loads: where a request's KV comes from, registered by the actor before the request
  is added; once vLLM allocated its blocks the load goes to every rank in the next step's
  metadata, and vLLM's own aggregation says when every rank has its share;
- migration pulls (copies into reserved blocks beside the engine) and their per-rank reports;
- layer-wise pushes (Splitwise): as a prefill, which blocks each step writes of the requests it
  pushes, and when each prefill finished; as a decode engine, the pushes it expects and their
  per-rank completion;
- the live-migration ledger (reservations, stop marks);
- transfer counters for the load reports.
The worker actor talks to it from its own threads (expect, release, pull, ...); vLLM calls it on
the engine loop thread. A lock guards everything both touch.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import ray

from cluster.kv.connector.metadata import (
    DisaggMetadata,
    LoadSpec,
    PushStep,
    PushTarget,
    RankEndpoint,
    RankReport,
    SourceSpec,
)
from cluster.kv.layout import blocks_for_tokens
from cluster.kv.migration_ledger import MigrationLedger

log = logging.getLogger(__name__)

_SCHEDULERS: dict[str, KVScheduler] = {}
_SCHEDULERS_LOCK = threading.Lock()


def register_scheduler(kv: KVScheduler) -> None:
    with _SCHEDULERS_LOCK:
        _SCHEDULERS[kv.scheduler_id] = kv


def get_scheduler(scheduler_id: str) -> KVScheduler:
    with _SCHEDULERS_LOCK:
        kv = _SCHEDULERS.get(scheduler_id)
    if kv is None:
        raise RuntimeError(f"no KV scheduler {scheduler_id!r} in this process; the worker actor must create it "
                           "before the engine")
    return kv


@dataclass(frozen=True)
class SourceRef:
    """A peer engine that holds KV for us: its instance id and worker actor."""

    instance_id: str
    actor: object


@dataclass
class _Hold:
    internal_id: str
    block_ids: list[int]
    num_tokens: int
    deadline: float
    # False for a migration stage's view of a running request's blocks: releasing it only forgets
    # the view (the request still owns its blocks; vLLM never delayed their free).
    owned: bool = True


@dataclass
class _Expected:
    source: SourceRef
    spec: SourceSpec | None
    num_tokens: int
    deadline: float


@dataclass
class _InFlight:
    transfer_id: str
    source: SourceRef
    started: float


@dataclass
class _Pull:
    spec: LoadSpec
    source: SourceRef | None
    done: threading.Event = field(default_factory=threading.Event)
    reports: int = 0
    ok: bool = True
    nbytes: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class TransferStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    transfers_in: int = 0
    transfers_out: int = 0
    failures: int = 0
    expired_holds: int = 0
    seconds_in_total: float = 0.0
    last_latency_s: float = 0.0

    def snapshot(self, blocks_held: int = 0) -> dict:
        return {**self.__dict__, "blocks_held": blocks_held}


class KVScheduler:
    def __init__(self, scheduler_id: str, instance_id: str, timeout_s: float = 30.0,
                 hold_timeout_s: float = 60.0):
        self.scheduler_id = scheduler_id
        self.instance_id = instance_id
        self.timeout_s = timeout_s
        self.hold_timeout_s = hold_timeout_s
        self.block_size = 0
        self.tp_size = 1
        self.ranks: tuple[RankEndpoint, ...] = ()
        self.stats = TransferStats()
        self.migrations = MigrationLedger(hold_timeout_s)
        self._lock = threading.Lock()
        self._holds: dict[str, _Hold] = {}
        self._expected: dict[str, _Expected] = {}
        self._in_flight: dict[str, _InFlight] = {}  # vLLM request id -> its load
        self._pulls: dict[str, _Pull] = {}
        self._pending = DisaggMetadata()
        self._pull_ids = itertools.count()
        self._sources: dict[tuple[str, str], SourceSpec] = {}
        self._pushing: dict[str, tuple[str, PushTarget]] = {}  # prefill: vLLM request id -> push
        self._expected_pushes: dict[str, _Pull] = {}  # decode: transfer id -> completion
        self.kv_cache_manager = None  # vLLM's, bound at start-up (block tables of pushing requests)
        # Set by the engine loop: wakes it when there is metadata to deliver.
        self.on_event = lambda: None

    # ---- set-up (vLLM's scheduler side) ----
    def bind(self, block_size: int, tp_size: int) -> None:
        self.block_size = block_size
        self.tp_size = tp_size

    def set_endpoints(self, endpoints: dict[int, RankEndpoint]) -> None:
        self.ranks = tuple(endpoints[r] for r in sorted(endpoints))

    # ---- producer: holds ----
    def hold(self, transfer_id: str, internal_id: str, block_ids: list[int], num_tokens: int) -> None:
        """A prefill finished: keep its blocks (vLLM delays their free) until released."""
        self.hold_blocks(transfer_id, internal_id, block_ids[:blocks_for_tokens(num_tokens, self.block_size)],
                         num_tokens)

    def hold_blocks(self, transfer_id: str, internal_id: str, block_ids: list[int], num_tokens: int,
                    owned: bool = True) -> None:
        with self._lock:
            self._holds[transfer_id] = _Hold(internal_id, list(block_ids), num_tokens,
                                             time.monotonic() + self.hold_timeout_s, owned)
            self._pending.new_holds[transfer_id] = tuple(block_ids)
        self.on_event()

    def hold_view(self, transfer_id: str, internal_id: str, block_ids: list[int], num_tokens: int) -> None:
        """Exposes blocks of a request that keeps running (a migration stage) for one pull."""
        self.hold_blocks(transfer_id, internal_id, block_ids, num_tokens, owned=False)

    def release(self, transfer_id: str) -> bool:
        """The consumer has the KV (or will never fetch it): let vLLM free the blocks."""
        with self._lock:
            hold = self._holds.pop(transfer_id, None)
            if hold is None:
                return False
            if self._pending.new_holds.pop(transfer_id, None) is None:
                self._pending.dropped_holds.append(transfer_id)
            if hold.owned:
                self._pending.finished_sending.append(hold.internal_id)
        self.on_event()
        return True

    def release_views(self, prefix: str) -> int:
        """Forgets every view hold whose transfer id starts with `prefix` (a cancelled migration)."""
        with self._lock:
            gone = [t for t, h in self._holds.items() if not h.owned and t.startswith(prefix)]
        return sum(self.release(t) for t in gone)

    def expire_holds(self) -> int:
        """Frees holds whose consumer never came (died, or the request was abandoned)."""
        now = time.monotonic()
        with self._lock:
            expired = [t for t, h in self._holds.items() if h.deadline < now]
        for transfer_id in expired:
            if self.release(transfer_id):
                log.warning("KV hold %s expired after %.0fs; freeing its blocks", transfer_id, self.hold_timeout_s)
                with self._lock:
                    self.stats.expired_holds += 1
        return len(expired)

    @property
    def num_holds(self) -> int:
        with self._lock:
            return len(self._holds)

    # ---- consumer: loads ----
    def resolve(self, source: SourceRef, timeout_s: float) -> SourceSpec | None:
        """The source engine's rank endpoints (cached per actor); None if it does not answer."""
        key = (source.instance_id, _actor_key(source.actor))
        with self._lock:
            spec = self._sources.get(key)
        if spec is not None:
            return spec
        try:
            ranks = ray.get(source.actor.kv_endpoints.remote(), timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("KV source %s unreachable: %s", source.instance_id, exc)
            return None
        spec = SourceSpec(source.instance_id, tuple(sorted(ranks, key=lambda r: r.rank)))
        with self._lock:
            self._sources[key] = spec
        return spec

    def expect(self, transfer_id: str, source: SourceRef, num_tokens: int) -> None:
        """Called before the request is added to the engine: where its KV will come from."""
        deadline = time.time() + self.timeout_s
        spec = self.resolve(source, self.timeout_s)
        with self._lock:
            self._expected[transfer_id] = _Expected(source, spec, num_tokens, deadline)

    def expected_tokens(self, transfer_id: str) -> int:
        with self._lock:
            exp = self._expected.get(transfer_id)
        return 0 if exp is None else exp.num_tokens

    def start_load(self, transfer_id: str, internal_id: str, block_ids: list[int]) -> None:
        """vLLM allocated the request's blocks: its load goes to the ranks in the next step."""
        with self._lock:
            exp = self._expected.pop(transfer_id, None)
            if exp is None:  # nothing registered: the ranks fail it at once (policy applies)
                self._pending.loads.append(LoadSpec(internal_id, transfer_id, tuple(block_ids), None, 0.0))
                return
            needed = blocks_for_tokens(exp.num_tokens, self.block_size)
            self._pending.loads.append(LoadSpec(internal_id, transfer_id, tuple(block_ids[:needed]), exp.spec,
                                                exp.deadline))
            self._in_flight[internal_id] = _InFlight(transfer_id, exp.source, time.monotonic())

    def forget(self, transfer_id: str) -> None:
        """A request dropped before its load started: the source may free its blocks now."""
        with self._lock:
            exp = self._expected.pop(transfer_id, None)
        if exp is not None:
            release_at_source(exp.source, transfer_id)

    # ---- migration pulls (beside the engine) ----
    def pull(self, source: SourceRef, transfer_id: str, block_ids: list[int], timeout_s: float) -> int:
        """Copies the source's hold `transfer_id` into `block_ids` (every rank its share), then
        lets the source drop the hold; returns bytes. Blocks the calling (actor) thread."""
        spec = self.resolve(source, timeout_s)
        key = f"pull-{next(self._pull_ids)}"
        pull = _Pull(LoadSpec(key, transfer_id, tuple(block_ids), spec, time.time() + timeout_s), source)
        started = time.monotonic()
        with self._lock:
            self._pulls[key] = pull
            self._pending.pulls.append(pull.spec)
        self.on_event()
        try:
            # The ranks stop at the deadline themselves; the grace covers their last report.
            if not pull.done.wait(timeout_s + 5.0):
                raise TimeoutError(f"ranks did not finish pulling {transfer_id} within {timeout_s:.1f}s")
            if not pull.ok:
                raise RuntimeError(f"pull of {transfer_id} failed: {'; '.join(pull.errors)}")
        except Exception:
            with self._lock:
                self.stats.failures += 1
            raise
        finally:
            with self._lock:
                self._pulls.pop(key, None)
            release_at_source(source, transfer_id)
        with self._lock:
            self.stats.transfers_in += 1
            self.stats.seconds_in_total += time.monotonic() - started
        return pull.nbytes

    # ---- layer-wise push, prefill side ----
    def register_push(self, internal_id: str, transfer_id: str, target: PushTarget) -> None:
        with self._lock:
            self._pushing[internal_id] = (transfer_id, target)

    def push_finished(self, internal_id: str, ok: bool) -> None:
        """The prefill ended: its ranks close the push once the last layer is out (a failed
        prefill sends nothing more; the decode side falls back)."""
        with self._lock:
            push = self._pushing.pop(internal_id, None)
            if push is not None and ok:
                self._pending.pushes_done.append(push)
        if push is not None:
            self.on_event()

    def _push_steps(self, scheduler_output) -> list[PushStep]:
        """What this step writes of every pushing request: the blocks covering its new tokens."""
        if not self._pushing or self.kv_cache_manager is None:
            return []
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        steps = []
        for internal_id, (transfer_id, target) in list(self._pushing.items()):
            n = scheduler_output.num_scheduled_tokens.get(internal_id, 0)
            if n <= 0 or internal_id not in computed:
                continue
            start = computed[internal_id]
            positions = tuple(range(start // self.block_size, (start + n - 1) // self.block_size + 1))
            blocks = self.kv_cache_manager.get_block_ids(internal_id)[0]
            steps.append(PushStep(transfer_id, target, positions, tuple(blocks[p] for p in positions)))
        return steps

    # ---- layer-wise push, decode side ----
    def expect_push(self, transfer_id: str, block_ids: list[int]) -> None:
        """Reserved blocks a prefill will push `transfer_id` into (announced to every rank)."""
        with self._lock:
            self._expected_pushes[transfer_id] = _Pull(LoadSpec(transfer_id, transfer_id, tuple(block_ids), None,
                                                                time.time() + self.timeout_s), None)
            self._pending.expect_pushes[transfer_id] = tuple(block_ids)
        self.on_event()

    def wait_push(self, transfer_id: str, timeout_s: float) -> tuple[bool, str]:
        """(complete, why not) once every rank has the whole push, or at the deadline."""
        with self._lock:
            push = self._expected_pushes.get(transfer_id)
        if push is None:
            return False, "no such push"
        if not push.done.wait(timeout_s):
            return False, f"not complete after {timeout_s:.1f}s"
        return push.ok, "; ".join(push.errors)

    def drop_push(self, transfer_id: str) -> None:
        with self._lock:
            push = self._expected_pushes.pop(transfer_id, None)
            if push is not None:
                if self._pending.expect_pushes.pop(transfer_id, None) is None:
                    self._pending.dropped_pushes.append(transfer_id)
        if push is not None:
            self.on_event()

    # ---- once per engine step (engine loop thread) ----
    def take_metadata(self, scheduler_output=None) -> DisaggMetadata:
        steps = self._push_steps(scheduler_output) if scheduler_output is not None else []
        with self._lock:
            meta, self._pending = self._pending, DisaggMetadata()
        meta.pushes = steps
        return meta

    def on_output(self, finished_recving: set[str], failed_recving: set[str], report: RankReport | None) -> None:
        """vLLM's aggregate of every rank's output for the step."""
        done = []
        with self._lock:
            for internal_id in finished_recving:
                load = self._in_flight.pop(internal_id, None)
                if load is None:
                    continue
                elapsed = time.monotonic() - load.started
                if internal_id in failed_recving:
                    self.stats.failures += 1
                else:
                    self.stats.transfers_in += 1
                    self.stats.seconds_in_total += elapsed
                    self.stats.last_latency_s = elapsed
                done.append(load)
            if report is not None:
                self.stats.bytes_received += report.bytes_received
                self.stats.bytes_sent += report.bytes_sent
                self.stats.transfers_out += report.transfers_out
                for results, table in ((report.pulls, self._pulls), (report.pushes, self._expected_pushes)):
                    for result in results:
                        pull = table.get(result.key)
                        if pull is None:
                            continue
                        pull.reports += 1
                        pull.nbytes += result.nbytes
                        if not result.ok:
                            pull.ok = False
                            pull.errors.append(result.error)
                        if pull.reports >= self.tp_size:
                            pull.done.set()
                            if table is self._expected_pushes:
                                self.stats.transfers_in += pull.ok
                                self.stats.failures += not pull.ok
        for load in done:
            release_at_source(load.source, load.transfer_id)

    def has_pending_work(self) -> bool:
        """Metadata to deliver or transfers whose ranks have not all reported: keep stepping."""
        with self._lock:
            return (bool(self._pending) or bool(self._in_flight) or bool(self._pulls)
                    or any(not p.done.is_set() for p in self._expected_pushes.values()))

    def stats_snapshot(self) -> dict:
        with self._lock:
            held = sum(len(h.block_ids) for h in self._holds.values() if h.owned)
            return self.stats.snapshot(held)


def release_at_source(source: SourceRef, transfer_id: str) -> None:
    """Tells a source engine it may free a hold (fire and forget: a dead source freed it anyway)."""
    try:
        source.actor.kv_release.remote(transfer_id)
    except ray.exceptions.RayError as exc:
        log.debug("release of %s at %s not sent: %s", transfer_id, source.instance_id, exc)


def _actor_key(actor) -> str:
    actor_id = getattr(actor, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else str(id(actor))
