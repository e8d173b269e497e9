"""KVTransferAgent: the per-worker bookkeeping behind the KV connector.

vLLM creates two connector objects (scheduler side and worker side); with the engine core
in-process both live in the worker actor's process, next to this agent, and talk to it
directly. The agent:
- on a producer (prefill), holds a finished request's blocks until the consumer confirms or
  a deadline passes, and exports them on request;
- on a consumer (decode), runs each load on a thread (the engine keeps stepping meanwhile),
  writes the blocks into the cache and reports completion or failure to vLLM's scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray

from cluster.kv.layout import KVCacheView, blocks_for_tokens
from cluster.kv.migration_ledger import MigrationLedger
from cluster.kv.transports.base import KVTransport, SourceRef, tensor_to_wire
from cluster.kv.transports.nccl import NcclSource
from cluster.kv.transports.shm import ShmPool, export_to_shm

log = logging.getLogger(__name__)

_AGENTS: dict[str, KVTransferAgent] = {}
_AGENTS_LOCK = threading.Lock()


def register_agent(agent: KVTransferAgent) -> None:
    with _AGENTS_LOCK:
        _AGENTS[agent.agent_id] = agent


def get_agent(agent_id: str) -> KVTransferAgent:
    with _AGENTS_LOCK:
        agent = _AGENTS.get(agent_id)
    if agent is None:
        raise RuntimeError(f"no KV transfer agent {agent_id!r} in this process; the worker must "
                           "create it before the engine")
    return agent


@dataclass
class _Hold:
    internal_id: str
    block_ids: list[int]
    num_tokens: int
    deadline: float
    # False for a migration stage's view of a running request's blocks: releasing it only
    # forgets the view (the request still owns its blocks; vLLM never delayed their free).
    owned: bool = True


@dataclass
class _Expected:
    source: SourceRef
    num_tokens: int
    deadline: float
    internal_id: str | None = None
    started: float = 0.0


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
    latencies_s: list[float] = field(default_factory=list)

    def snapshot(self, blocks_held: int = 0) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "latencies_s"}
        d["blocks_held"] = blocks_held
        return d


class KVTransferAgent:
    def __init__(self, agent_id: str, transport: KVTransport, timeout_s: float = 30.0,
                 hold_timeout_s: float = 60.0, max_parallel_loads: int = 2):
        self.agent_id = agent_id
        self.transport = transport
        self.timeout_s = timeout_s
        self.hold_timeout_s = hold_timeout_s
        self.cache: KVCacheView | None = None
        self.block_size = 0
        self.stats = TransferStats()
        self._lock = threading.Lock()
        self._holds: dict[str, _Hold] = {}
        self._expected: dict[str, _Expected] = {}
        self._finished_sending: set[str] = set()
        self._finished_recving: set[str] = set()
        self._failed_recving: set[str] = set()
        self._pool = ThreadPoolExecutor(max_parallel_loads, thread_name_prefix=f"kv-load-{agent_id}")
        self._nccl_source = None
        self._shm_pool = None
        self.migrations = MigrationLedger(hold_timeout_s)
        # Set by the engine loop: wakes it when a hand-off needs an engine step.
        self.on_event = lambda: None

    # ---- set-up (worker side connector) ----
    def register_kv_caches(self, kv_caches: dict, num_blocks: int, block_size: int) -> None:
        self.cache = KVCacheView(kv_caches, num_blocks)
        self.block_size = block_size

    # ---- producer ----
    def hold(self, transfer_id: str, internal_id: str, block_ids: list[int], num_tokens: int) -> None:
        """Called when a prefill request finishes: keep its blocks until released."""
        self.hold_blocks(transfer_id, internal_id, block_ids[:blocks_for_tokens(num_tokens, self.block_size)],
                         num_tokens)

    def hold_view(self, transfer_id: str, internal_id: str, block_ids: list[int], num_tokens: int) -> None:
        """Exposes blocks of a request that keeps running (a migration stage) for one pull."""
        with self._lock:
            self._holds[transfer_id] = _Hold(internal_id, list(block_ids), num_tokens,
                                             time.monotonic() + self.hold_timeout_s, owned=False)

    def hold_blocks(self, transfer_id: str, internal_id: str, block_ids: list[int], num_tokens: int) -> None:
        """Holds exactly `block_ids` of a finished request (vLLM delays their free) until released."""
        with self._lock:
            self._holds[transfer_id] = _Hold(internal_id, list(block_ids), num_tokens,
                                             time.monotonic() + self.hold_timeout_s)

    def release_views(self, prefix: str) -> int:
        """Forgets every view hold whose transfer id starts with `prefix` (a cancelled migration)."""
        with self._lock:
            gone = [t for t, h in self._holds.items() if not h.owned and t.startswith(prefix)]
            for t in gone:
                del self._holds[t]
        return len(gone)

    def export(self, transfer_id: str) -> dict | None:
        """The held blocks of `transfer_id` as wire arrays (None if not held)."""
        with self._lock:
            hold = self._holds.get(transfer_id)
        if hold is None or self.cache is None:
            return None
        slabs = self.cache.read_blocks(hold.block_ids)
        layers = [tensor_to_wire(s) for s in slabs]
        with self._lock:
            self.stats.bytes_sent += sum(a.nbytes for a, _, _ in layers)
            self.stats.transfers_out += 1
        return {"signature": self.cache.signature(), "num_tokens": hold.num_tokens, "layers": layers}

    def export_shm(self, transfer_id: str) -> dict | None:
        """The held blocks of `transfer_id`, gathered into a shared-memory segment (same host)."""
        blocks = self.held_blocks(transfer_id)
        if blocks is None or self.cache is None:
            return None
        if self._shm_pool is None:
            self._shm_pool = ShmPool()
        meta = export_to_shm(self._shm_pool, transfer_id, self.cache, blocks)
        with self._lock:
            self.stats.bytes_sent += len(blocks) * self.cache.bytes_per_block
            self.stats.transfers_out += 1
        return meta

    def warm_exports(self, spare_segments: int = 1) -> None:
        """Same-host transports: have a pre-faulted segment ready beyond any in use (called
        during a migration's pre-copy, so the tail's export inside the downtime is fast)."""
        if self.transport.name not in ("auto", "shm"):
            return
        if self._shm_pool is None:
            self._shm_pool = ShmPool()
        self._shm_pool.keep_free(spare_segments)

    def nccl_join(self, key: str, unique_id, signature) -> bool:
        if self._nccl_source is None:
            self._nccl_source = NcclSource()
        return self._nccl_source.join(key, unique_id, signature, self.cache)

    def nccl_send(self, key: str, transfer_id: str) -> bool:
        blocks = self.held_blocks(transfer_id)
        if blocks is None or self._nccl_source is None:
            return False
        self._nccl_source.send(key, self.cache, blocks)
        with self._lock:
            self.stats.bytes_sent += len(blocks) * self.cache.bytes_per_block
            self.stats.transfers_out += 1
        return True

    def held_blocks(self, transfer_id: str) -> list[int] | None:
        with self._lock:
            hold = self._holds.get(transfer_id)
        return None if hold is None else list(hold.block_ids)

    def release(self, transfer_id: str) -> bool:
        """The consumer has the KV (or will never fetch it): let vLLM free the blocks."""
        with self._lock:
            hold = self._holds.pop(transfer_id, None)
            if hold is not None and hold.owned:
                self._finished_sending.add(hold.internal_id)
        if self._shm_pool is not None:
            self._shm_pool.give_back(transfer_id)
        if hold is not None and hold.owned:
            self.on_event()
        return hold is not None

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

    def stats_snapshot(self) -> dict:
        with self._lock:
            held = sum(len(h.block_ids) for h in self._holds.values() if h.owned)
            return self.stats.snapshot(held)

    # ---- consumer ----
    def expect(self, transfer_id: str, source: SourceRef, num_tokens: int) -> None:
        """Called before the request is added to the engine: where its KV will come from."""
        with self._lock:
            self._expected[transfer_id] = _Expected(source, num_tokens, time.monotonic() + self.timeout_s)

    def expected_tokens(self, transfer_id: str) -> int:
        with self._lock:
            exp = self._expected.get(transfer_id)
        return 0 if exp is None else exp.num_tokens

    def start_load(self, transfer_id: str, internal_id: str, block_ids: list[int]) -> None:
        """Called by the scheduler-side connector once vLLM allocated the request's blocks."""
        with self._lock:
            exp = self._expected.get(transfer_id)
            if exp is None:
                self._failed_recving.add(internal_id)
                self._finished_recving.add(internal_id)
                return
            exp.internal_id = internal_id
            exp.started = time.monotonic()
        needed = blocks_for_tokens(exp.num_tokens, self.block_size)
        self._pool.submit(self._load, transfer_id, exp, list(block_ids[:needed]))

    def _load(self, transfer_id: str, exp: _Expected, block_ids: list[int]) -> None:
        ok = False
        try:
            left = max(0.1, exp.deadline - time.monotonic())
            nbytes = self.transport.fetch(exp.source, transfer_id, self.cache, block_ids, left)
            ok = True
        except Exception as exc:  # noqa: BLE001 - any failure of one transfer follows the failure policy
            log.warning("KV load of %s failed: %s", transfer_id, exc)
            nbytes = 0
        finally:
            self.release_source(exp.source, transfer_id)
        elapsed = time.monotonic() - exp.started
        with self._lock:
            self._expected.pop(transfer_id, None)
            if ok:
                self.stats.bytes_received += nbytes
                self.stats.transfers_in += 1
                self.stats.seconds_in_total += elapsed
                self.stats.last_latency_s = elapsed
                self.stats.latencies_s.append(elapsed)
                del self.stats.latencies_s[:-1024]
            else:
                self.stats.failures += 1
                self._failed_recving.add(exp.internal_id)
            # vLLM expects failed loads in finished_recving too, to leave the wait state.
            self._finished_recving.add(exp.internal_id)
        self.on_event()

    @staticmethod
    def release_source(source, transfer_id: str) -> None:
        try:
            source.actor.kv_release.remote(transfer_id)
        except ray.exceptions.RayError as exc:  # the source is gone; its blocks went with it
            log.debug("release of %s at %s not sent: %s", transfer_id, source.instance_id, exc)

    def pull(self, source: SourceRef, transfer_id: str, block_ids: list[int], timeout_s: float) -> int:
        """Copies the source's hold `transfer_id` into `block_ids` now (a migration stage),
        then lets the source drop the hold; returns bytes."""
        started = time.monotonic()
        try:
            nbytes = self.transport.fetch(source, transfer_id, self.cache, block_ids, timeout_s)
        except Exception:
            with self._lock:
                self.stats.failures += 1
            raise
        finally:
            self.release_source(source, transfer_id)
        with self._lock:
            self.stats.bytes_received += nbytes
            self.stats.transfers_in += 1
            self.stats.seconds_in_total += time.monotonic() - started
        return nbytes

    def forget(self, transfer_id: str) -> None:
        """A request dropped before its load started."""
        with self._lock:
            exp = self._expected.get(transfer_id)
            if exp is not None and exp.internal_id is None:
                self._expected.pop(transfer_id)
            else:
                return
        self.release_source(exp.source, transfer_id)

    # ---- both: polled by the worker-side connector every engine step ----
    def take_finished(self) -> tuple[set[str], set[str], set[str]]:
        with self._lock:
            sending, self._finished_sending = self._finished_sending, set()
            recving, self._finished_recving = self._finished_recving, set()
            failed, self._failed_recving = self._failed_recving, set()
        return sending, recving, failed

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._finished_sending or self._finished_recving or
                        any(e.internal_id is not None for e in self._expected.values()))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._shm_pool is not None:
            self._shm_pool.close()
