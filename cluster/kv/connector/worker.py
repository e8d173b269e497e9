"""The worker side of our KV connector: one `RankWorker` per vLLM rank process.

It owns the rank's shard of the KV cache (every layer's local KV heads, target and draft) and:
- serves the blocks the engine holds for peers on the rank's side channel (the source side of
  every transport), learning which transfer ids are held from the scheduler side's metadata;
- runs the loads and migration pulls the scheduler side decided, on its own threads, each one
  moving only this rank's share: the heads it holds, from the source rank(s) that hold them
  (cluster/kv/heads.py plans that when the two engines differ in TP degree);
- reports finished and failed transfers and byte counts back through vLLM's channels.

It never sees the scheduler, and the scheduler never sees it: everything crosses in
DisaggMetadata (down) and KVConnectorOutput / RankReport (up).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cluster.kv.channel import ClientPool, Endpoint, RankServer
from cluster.kv.connector.metadata import DisaggMetadata, LoadSpec, PullResult, RankEndpoint, RankReport
from cluster.kv.connector.push import PushReceiver, PushSender
from cluster.kv.heads import HeadLayoutError, heads_of_rank, plan_rank
from cluster.kv.layout import HeadRange, KVCacheView
from cluster.kv.transports import FetchRequest, TransferError, make_transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankGeometry:
    rank: int
    tp_size: int
    total_kv_heads: int
    local_kv_heads: int | None  # None when layers differ (whole-block transfers only)


class RankWorker:
    def __init__(self, settings: dict, geometry: RankGeometry, max_parallel_loads: int = 2):
        self.settings = settings
        self.geometry = geometry
        self.instance_id = settings.get("instance_id", "")
        self.view: KVCacheView | None = None
        self._server: RankServer | None = None
        self._transport = None
        self._clients = ClientPool()
        self._pool = ThreadPoolExecutor(max_parallel_loads, thread_name_prefix=f"kv-r{geometry.rank}")
        self._lock = threading.Lock()
        self._held: dict[str, tuple[int, ...]] = {}
        self._held_changed = threading.Condition(self._lock)
        self._finished_sending: set[str] = set()
        self._finished_recving: set[str] = set()
        self._failed_recving: set[str] = set()
        self._pull_results: list[PullResult] = []
        # Set whenever a load or pull finishes (the engine polls per step; benchmarks wait on it).
        self.results_ready = threading.Event()
        self._bytes_received = 0
        self._bytes_sent = 0
        self._transfers_out = 0

    # ---- start-up ----
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        self.view = KVCacheView(kv_caches, num_blocks, self.geometry.local_kv_heads)
        host = self.settings.get("host", "127.0.0.1")
        self._transport = make_transport(self.settings.get("transport", "auto"), host,
                                         f"{self.instance_id}/r{self.geometry.rank}")
        g = self.geometry
        self.push_sender = PushSender(self.view, g.rank, g.tp_size, g.total_kv_heads, self._clients)
        self.push_receiver = PushReceiver(self.view, g.rank, g.tp_size, g.total_kv_heads,
                                          float(self.settings.get("announce_timeout_s", 10.0)))
        handlers = {**self._transport.source_handlers(self), **self.push_receiver.handlers()}
        self._server = RankServer(handlers, host=host, name=f"kv-{self.instance_id}-r{g.rank}")
        warm = getattr(getattr(self._transport, "local", self._transport), "pool", None)
        if warm is not None:  # shared memory: segments faulted in before the first transfer
            threading.Thread(target=warm.keep_free, args=(2,), daemon=True).start()

    def endpoint(self) -> RankEndpoint:
        g = self.geometry
        return RankEndpoint(g.rank, g.tp_size, self._server.endpoint.host, self._server.endpoint.port, os.getpid(),
                            g.total_kv_heads, g.local_kv_heads or 0, self.view.signature())

    # ---- the scheduler side's decisions, once per engine step ----
    def on_metadata(self, meta: DisaggMetadata) -> None:
        with self._lock:
            self._held.update(meta.new_holds)
            for transfer_id in meta.dropped_holds:
                self._held.pop(transfer_id, None)
            self._finished_sending.update(meta.finished_sending)
            if meta.new_holds:
                self._held_changed.notify_all()
        for load in meta.loads:
            self._pool.submit(self._run_load, load)
        for pull in meta.pulls:
            self._pool.submit(self._run_pull, pull)
        self.push_sender.begin_step(meta.pushes, meta.pushes_done)
        self.push_receiver.expect(meta.expect_pushes, meta.dropped_pushes)

    # ---- source side (SourceContext for the transports) ----
    def held_blocks(self, transfer_id: str, timeout_s: float) -> list[int]:
        """Waits (bounded) for the hold to be announced: a peer may ask one step before this rank
        hears of it."""
        deadline = time.monotonic() + min(timeout_s, float(self.settings.get("announce_timeout_s", 10.0)))
        with self._lock:
            while transfer_id not in self._held:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferError(f"{self.instance_id} rank {self.geometry.rank} holds no blocks for "
                                        f"{transfer_id}")
                self._held_changed.wait(left)
            return list(self._held[transfer_id])

    def count_sent(self, nbytes: int) -> None:
        with self._lock:
            self._bytes_sent += nbytes
            self._transfers_out += 1

    # ---- destination side ----
    def _copy(self, load: LoadSpec) -> int:
        if load.source is None:
            raise TransferError(f"the source of {load.transfer_id} could not be reached")
        source = load.source
        g = self.geometry
        first = source.ranks[0]
        if source.tp_size != len({r.rank for r in source.ranks}) or first.tp_size != source.tp_size:
            raise TransferError(f"{source.instance_id} published an inconsistent set of ranks")
        if first.total_kv_heads != g.total_kv_heads or tuple(first.signature) != self.view.signature():
            raise TransferError(f"KV layout mismatch between {source.instance_id} and {self.instance_id} "
                                "(model, dtype or block size differ)")
        if source.tp_size == g.tp_size:
            plan = [(source.ranks[g.rank], None, None)]  # rank i from rank i, whole blocks
        else:
            if g.local_kv_heads is None:
                raise TransferError("transfers between TP degrees need one KV head count for every layer")
            plan = []
            for piece in plan_rank(g.rank, g.tp_size, source.tp_size, g.total_kv_heads):
                plan.append((source.ranks[piece.src_rank], HeadRange(piece.src_start, piece.count),
                             HeadRange(piece.dst_start, piece.count)))
        nbytes = 0
        for endpoint, src_heads, dst_heads in plan:
            left = load.deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"KV of {load.transfer_id} not received in time")
            client = self._clients.get(Endpoint(endpoint.host, endpoint.port))
            request = FetchRequest(load.transfer_id, list(load.block_ids), src_heads, dst_heads, left)
            nbytes += self._transport.fetch(client, request, self.view)
        return nbytes

    def _run_load(self, load: LoadSpec) -> None:
        try:
            nbytes, ok = self._copy(load), True
        except Exception as exc:  # noqa: BLE001 - any failure of one transfer follows the failure policy
            log.warning("KV load of %s failed on rank %d: %s", load.transfer_id, self.geometry.rank, exc)
            nbytes, ok = 0, False
        with self._lock:
            self._bytes_received += nbytes
            if not ok:
                self._failed_recving.add(load.key)
            # vLLM expects failed loads in finished_recving too, to leave the wait state.
            self._finished_recving.add(load.key)
        self.results_ready.set()

    def _run_pull(self, pull: LoadSpec) -> None:
        try:
            result = PullResult(pull.key, True, self._copy(pull))
        except Exception as exc:  # noqa: BLE001 - reported to the migration, which aborts cleanly
            result = PullResult(pull.key, False, 0, f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._bytes_received += result.nbytes
            self._pull_results.append(result)
        self.results_ready.set()

    # ---- reports, once per engine step ----
    def take_results(self) -> tuple[set[str], set[str], set[str]]:
        with self._lock:
            sending, self._finished_sending = self._finished_sending, set()
            recving, self._finished_recving = self._finished_recving, set()
            failed, self._failed_recving = self._failed_recving, set()
        return sending, recving, failed

    def report(self) -> RankReport | None:
        pushes = self.push_receiver.take_results() if self.view is not None else []
        with self._lock:
            report = RankReport(self._pull_results, self._bytes_received, self._bytes_sent, self._transfers_out,
                                pushes)
            self._pull_results, self._bytes_received, self._bytes_sent, self._transfers_out = [], 0, 0, 0
        report.bytes_received += sum(p.nbytes for p in pushes)
        if self.view is not None:
            sent, self.push_sender.bytes_sent = self.push_sender.bytes_sent, 0
            report.bytes_sent += sent
        return report if (report.pulls or report.pushes or report.bytes_received or report.bytes_sent) else None

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self.push_sender.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._clients.close()
        if self._transport is not None:
            self._transport.close()


def rank_geometry(vllm_config, kv_cache_config, rank: int, tp_size: int) -> RankGeometry:
    """This rank's place in the engine's TP group and the KV heads it holds (vLLM's config)."""
    total = vllm_config.model_config.get_total_num_kv_heads()
    local = {g.kv_cache_spec.num_kv_heads for g in kv_cache_config.kv_cache_groups
             if hasattr(g.kv_cache_spec, "num_kv_heads")}
    local_heads = local.pop() if len(local) == 1 else None
    if local_heads is not None:
        try:
            if len(heads_of_rank(rank, tp_size, total)) != local_heads:
                local_heads = None  # e.g. a draft model with other heads: whole-block copies only
        except HeadLayoutError:
            local_heads = None
    return RankGeometry(rank, tp_size, total, local_heads)
