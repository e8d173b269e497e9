"""Layer-wise push (Splitwise): a prefill engine's ranks send each layer's KV to the decode
engine chosen before the prefill started, as soon as the layer is computed, so the hand-off
overlaps the prefill instead of following it.

Source rank (`PushSender`): each engine step's metadata lists the blocks of pushing requests
the step writes; `save_kv_layer` queues each layer as it is computed (and `wait_for_save` what no
layer hook covered, e.g. draft layers); one sender thread gathers the layer's share for every
destination rank it serves (cluster/kv/heads.py: the heads that rank holds) and streams it on
the side channel, in order. When the prefill finished, it tells each destination rank how many
pieces it sent.

Destination rank (`PushReceiver`): writes each piece into the blocks the decode engine reserved
for the request (announced in its metadata; pieces for anything else are refused), counts them,
and reports the push complete once every source rank it hears from said how many it sent and
all arrived. A partial last block is pushed again by the next chunk; order per rank pair is
kept by the one connection, so the later copy wins.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict

import torch

from cluster.kv.channel import ClientPool, Endpoint, recv_payload
from cluster.kv.connector.metadata import PullResult, PushStep, PushTarget
from cluster.kv.heads import plan_rank
from cluster.kv.layout import HeadRange, KVCacheView
from cluster.kv.transports.base import heads_from_json, heads_json

log = logging.getLogger(__name__)


def _slices_from(src_rank: int, src_tp: int, target: PushTarget, total_heads: int):
    """(destination rank endpoint, source head range, destination head range) this source rank
    sends to, for every destination rank."""
    dst_tp = len(target.ranks)
    out = []
    for dst in target.ranks:
        if dst_tp == src_tp:
            if dst.rank == src_rank:
                out.append((dst, None, None))
            continue
        for piece in plan_rank(dst.rank, dst_tp, src_tp, total_heads):
            if piece.src_rank == src_rank:
                out.append((dst, HeadRange(piece.src_start, piece.count), HeadRange(piece.dst_start, piece.count)))
    return out


def senders_to(dst_rank: int, dst_tp: int, src_tp: int, total_heads: int) -> set[int]:
    """The source ranks that push to destination rank `dst_rank`."""
    if src_tp == dst_tp:
        return {dst_rank}
    return {piece.src_rank for piece in plan_rank(dst_rank, dst_tp, src_tp, total_heads)}


class PushSender:
    def __init__(self, view: KVCacheView, rank: int, tp_size: int, total_heads: int, clients: ClientPool,
                 timeout_s: float = 30.0):
        self.view, self.rank, self.tp_size, self.total_heads = view, rank, tp_size, total_heads
        self.clients = clients
        self.timeout_s = timeout_s
        self._step: list[PushStep] = []
        self._sent_layers: set[str] = set()
        self._queue: queue.Queue = queue.Queue()
        self._pieces: dict[tuple[str, int], int] = defaultdict(int)  # (transfer, dst rank) -> pieces
        self._failed: set[str] = set()
        self.bytes_sent = 0
        threading.Thread(target=self._run, name=f"kv-push-r{rank}", daemon=True).start()

    # ---- engine thread ----
    def begin_step(self, pushes: list[PushStep], done: list[tuple[str, PushTarget]]) -> None:
        self.flush_step()
        self._step = list(pushes)
        self._sent_layers = set()
        for transfer_id, target in done:
            self._queue.put(("done", transfer_id, target))

    def layer_computed(self, layer_name: str) -> None:
        if not self._step or layer_name in self._sent_layers:
            return
        self._sent_layers.add(layer_name)
        for push in self._step:
            self._queue.put(("layer", push, layer_name))

    def flush_step(self) -> None:
        """The step's forward pass is over: queue every layer no layer hook announced."""
        for layer in self.view.layers:
            self.layer_computed(layer.name)
        self._step = []

    # ---- sender thread ----
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if item[0] == "layer":
                    self._send_layer(item[1], item[2])
                else:
                    self._send_done(item[1], item[2])
            except Exception as exc:  # noqa: BLE001 - the push fails; the destination falls back to pulling
                transfer_id = item[1] if item[0] == "done" else item[1].transfer_id
                log.warning("layer-wise push of %s failed on rank %d: %s", transfer_id, self.rank, exc)
                self._failed.add(transfer_id)

    def _send_layer(self, push: PushStep, layer_name: str) -> None:
        if push.transfer_id in self._failed:
            return
        layer = self.view.layer(layer_name)
        dst_blocks = [push.target.block_ids[p] for p in push.positions if p < len(push.target.block_ids)]
        src_blocks = list(push.src_block_ids[:len(dst_blocks)])
        if not src_blocks:
            return
        for dst, src_heads, dst_heads in _slices_from(self.rank, self.tp_size, push.target, self.total_heads):
            slab = self.view.gather_layer(layer, src_blocks, src_heads).contiguous()
            payload = slab.view(torch.uint8).reshape(-1).numpy() if slab.device.type == "cpu" else \
                slab.cpu().view(torch.uint8).reshape(-1).numpy()
            client = self.clients.get(Endpoint(dst.host, dst.port))
            with client.lock:
                client.send({"op": "push_layer", "transfer_id": push.transfer_id, "layer": layer_name,
                             "blocks": dst_blocks, "heads": heads_json(dst_heads), "src_rank": self.rank,
                             "src_tp": self.tp_size, "shape": list(slab.shape), "nbytes": payload.nbytes},
                            self.timeout_s, payload=memoryview(payload))
            self._pieces[(push.transfer_id, dst.rank)] += 1
            self.bytes_sent += payload.nbytes

    def _send_done(self, transfer_id: str, target: PushTarget) -> None:
        failed = transfer_id in self._failed
        for dst, _, _ in _slices_from(self.rank, self.tp_size, target, self.total_heads):
            client = self.clients.get(Endpoint(dst.host, dst.port))
            with client.lock:
                client.send({"op": "push_done", "transfer_id": transfer_id, "src_rank": self.rank,
                             "src_tp": self.tp_size, "failed": failed,
                             "pieces": self._pieces.pop((transfer_id, dst.rank), 0)}, self.timeout_s)
        self._failed.discard(transfer_id)

    def close(self) -> None:
        self._queue.put(None)


class PushReceiver:
    def __init__(self, view: KVCacheView, rank: int, tp_size: int, total_heads: int,
                 announce_timeout_s: float = 10.0):
        self.view, self.rank, self.tp_size, self.total_heads = view, rank, tp_size, total_heads
        self.announce_timeout_s = announce_timeout_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._expected: dict[str, set[int]] = {}
        self._pieces: dict[tuple[str, int], int] = defaultdict(int)  # (transfer, src rank) -> pieces
        self._done: dict[str, dict[int, tuple[int, bool]]] = defaultdict(dict)  # transfer -> src rank -> (n, failed)
        self._errors: dict[str, str] = {}
        self._results: list[PullResult] = []
        self._bytes: dict[str, int] = defaultdict(int)
        self.bytes_received = 0

    # ---- engine thread (metadata) ----
    def expect(self, pushes: dict[str, tuple[int, ...]], dropped: list[str]) -> None:
        with self._lock:
            for transfer_id, blocks in pushes.items():
                self._expected[transfer_id] = set(blocks)
            for transfer_id in dropped:
                self._forget(transfer_id)
            if pushes:
                self._changed.notify_all()

    def _forget(self, transfer_id: str) -> None:
        self._expected.pop(transfer_id, None)
        self._done.pop(transfer_id, None)
        self._errors.pop(transfer_id, None)
        self._bytes.pop(transfer_id, None)
        for key in [k for k in self._pieces if k[0] == transfer_id]:
            del self._pieces[key]

    def take_results(self) -> list[PullResult]:
        with self._lock:
            results, self._results = self._results, []
        return results

    # ---- side-channel handlers ----
    def handlers(self) -> dict:
        return {"push_layer": self._on_layer, "push_done": self._on_done}

    def _on_layer(self, request: dict, conn) -> None:
        nbytes = int(request["nbytes"])
        raw = torch.empty(nbytes, dtype=torch.uint8)
        recv_payload(conn, memoryview(raw.numpy()))  # first: the stream must stay in step whatever happens
        transfer_id = request["transfer_id"]
        blocks = [int(b) for b in request["blocks"]]
        try:
            layer = self.view.layer(request["layer"])
            slab = raw.view(layer.dtype).reshape(request["shape"])
            self._wait_expected(transfer_id)
            with self._lock:
                allowed = self._expected.get(transfer_id, set())
            if not set(blocks) <= allowed:
                stray = sorted(set(blocks) - allowed)
                raise ValueError(f"push {transfer_id} writes blocks {stray} not reserved for it")
            self.view.scatter_layer(layer, blocks, slab, heads_from_json(request.get("heads")))
        except Exception as exc:  # noqa: BLE001 - recorded: the push reports failed when it is done
            with self._lock:
                self._errors.setdefault(transfer_id, f"{type(exc).__name__}: {exc}")
            return None
        with self._lock:
            self._pieces[(transfer_id, int(request["src_rank"]))] += 1
            self._bytes[transfer_id] += nbytes
        return None

    def _wait_expected(self, transfer_id: str) -> None:
        deadline = time.monotonic() + self.announce_timeout_s
        with self._lock:
            while transfer_id not in self._expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ValueError(f"no push {transfer_id} is expected here")
                self._changed.wait(left)

    def _on_done(self, request: dict, _conn) -> None:
        transfer_id = request["transfer_id"]
        senders = senders_to(self.rank, self.tp_size, int(request["src_tp"]), self.total_heads)
        with self._lock:
            if transfer_id not in self._expected:
                return None
            self._done[transfer_id][int(request["src_rank"])] = (int(request["pieces"]), bool(request["failed"]))
            if set(self._done[transfer_id]) < senders:
                return None  # another source rank has not finished yet
            error = self._errors.get(transfer_id, "")
            for src_rank, (pieces, failed) in self._done[transfer_id].items():
                if failed:
                    error = error or f"source rank {src_rank} failed to push"
                elif self._pieces.get((transfer_id, src_rank), 0) != pieces:
                    error = error or (f"{self._pieces.get((transfer_id, src_rank), 0)} of {pieces} pieces from "
                                      f"source rank {src_rank} arrived")
            nbytes = self._bytes.get(transfer_id, 0)
            self.bytes_received += nbytes
            self._results.append(PullResult(transfer_id, not error, nbytes, error))
            self._forget(transfer_id)
        return None
