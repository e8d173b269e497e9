"""Same-host KV transport through POSIX shared memory.

The source rank gathers the held blocks (and heads) once, straight into a pooled, pre-faulted
shared-memory segment, and answers with the segment's name and the slab layout; the destination
maps the segment (mappings are kept: segments are reused) and scatters from it into its cache,
then gives the segment back. Two copies in all, the minimum for blocks that are not contiguous
on either side, and two side-channel round trips.
"""

from __future__ import annotations

import threading
import uuid
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from cluster.kv.channel import RankClient, send_frame
from cluster.kv.layout import KVCacheView
from cluster.kv.transports.base import (
    FetchRequest,
    RankTransport,
    SourceContext,
    check_layout,
    chunk_plan,
    heads_from_json,
    heads_json,
    slab_layout,
    slab_views,
)

MIN_SEGMENT_BYTES = 16 << 20
# Segments this process created: when a destination rank shares the process (tests, the GPU
# check), attaching must not take the creator's resource-tracker registration away.
_CREATED: set[str] = set()


def _prefaulted(nbytes: int) -> shared_memory.SharedMemory:
    """A new segment with its pages faulted in now, not during a transfer. numpy writes the
    zeros without holding the GIL, so the engine thread in this process keeps stepping."""
    seg = shared_memory.SharedMemory(create=True, size=nbytes)
    _CREATED.add(seg.name)
    pages = np.frombuffer(seg.buf, dtype=np.uint8)
    pages[:] = 0
    del pages  # no view may outlive the segment's close()
    return seg


class ShmPool:
    """Source side: pre-faulted segments lent to one export at a time."""

    def __init__(self):
        self._free: list[shared_memory.SharedMemory] = []
        self._lent: dict[str, shared_memory.SharedMemory] = {}
        self._lock = threading.Lock()

    def lend(self, lease: str, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
                self._lent[lease] = seg
                return seg
        seg = _prefaulted(max(nbytes, MIN_SEGMENT_BYTES))
        with self._lock:
            self._lent[lease] = seg
        return seg

    def keep_free(self, count: int, nbytes: int = MIN_SEGMENT_BYTES) -> None:
        """Pre-faults segments until `count` of at least `nbytes` are free, so a later export
        that is latency-critical (a migration's tail, inside its downtime) finds one ready."""
        while True:
            with self._lock:
                if sum(1 for s in self._free if s.size >= nbytes) >= count:
                    return
            seg = _prefaulted(max(nbytes, MIN_SEGMENT_BYTES))
            with self._lock:
                self._free.append(seg)

    def give_back(self, lease: str) -> bool:
        with self._lock:
            seg = self._lent.pop(lease, None)
            if seg is not None:
                self._free.append(seg)
        return seg is not None

    def close(self) -> None:
        with self._lock:
            for seg in self._free + list(self._lent.values()):
                seg.close()
                seg.unlink()
            self._free.clear()
            self._lent.clear()


class _Attached:
    """Destination side: mappings of the source's segments, kept for reuse."""

    def __init__(self, limit: int = 64):
        self._segments: dict[str, shared_memory.SharedMemory] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, name: str) -> shared_memory.SharedMemory:
        with self._lock:
            seg = self._segments.get(name)
            if seg is not None:
                return seg
            seg = shared_memory.SharedMemory(name=name)
            if name not in _CREATED:
                # Attaching registers the segment with this process's tracker, which would unlink
                # it at exit; the source owns it.
                resource_tracker.unregister(seg._name, "shared_memory")
            if len(self._segments) >= self._limit:
                self._segments.pop(next(iter(self._segments))).close()
            self._segments[name] = seg
            return seg

    def drop(self, name: str) -> None:
        with self._lock:
            seg = self._segments.pop(name, None)
        if seg is not None:
            seg.close()

    def close(self) -> None:
        with self._lock:
            for seg in self._segments.values():
                seg.close()
            self._segments.clear()


class SharedMemoryTransport(RankTransport):
    name = "shm"

    def __init__(self):
        self.pool = ShmPool()
        self._attached = _Attached()

    # ---- source side ----
    def source_handlers(self, ctx: SourceContext):
        def export(request: dict, conn):
            heads = heads_from_json(request.get("heads"))
            blocks = ctx.held_blocks(request["transfer_id"], float(request["timeout_s"]))
            nbytes = ctx.view.slab_bytes(len(blocks), heads)
            chunks = chunk_plan(ctx.view, len(blocks), heads)
            lease = uuid.uuid4().hex
            seg = self.pool.lend(lease, nbytes)
            for i, (start, count, offset) in enumerate(chunks):
                layout = slab_layout(ctx.view, count, heads, offset)
                ctx.view.gather(blocks[start:start + count], heads, out=slab_views(seg.buf, layout))
                if i == 0:  # the reply says chunk 0 is there: a small transfer is one round trip
                    send_frame(conn, {"segment": seg.name, "lease": lease, "num_blocks": len(blocks),
                                      "chunks": chunks, "layout": slab_layout(ctx.view, len(blocks), heads)})
                else:
                    send_frame(conn, {"ready": i})  # the destination scatters it while we gather the next
            if not chunks:
                send_frame(conn, {"segment": seg.name, "lease": lease, "num_blocks": 0, "chunks": [],
                                  "layout": slab_layout(ctx.view, 0, heads)})
            ctx.count_sent(nbytes)
            return None

        def release(request: dict, _conn):
            return {"released": self.pool.give_back(request["lease"])}

        return {"shm_export": export, "shm_release": release}

    # ---- destination side ----
    def fetch(self, client: RankClient, request: FetchRequest, view: KVCacheView) -> int:
        nbytes = 0
        with client.lock:
            meta = client.call({"op": "shm_export", "transfer_id": request.transfer_id,
                                "heads": heads_json(request.src_heads), "timeout_s": request.timeout_s},
                               request.timeout_s)
            try:
                check_layout(view, request, meta["num_blocks"], meta["layout"])
                seg = self._attached.get(meta["segment"])
                for i, (start, count, offset) in enumerate(meta["chunks"]):
                    if i:
                        client.recv(request.timeout_s)  # chunk i gathered (chunk 0 came with the reply)
                    slabs = slab_views(seg.buf, slab_layout(view, count, request.dst_heads, offset))
                    nbytes += view.scatter(request.block_ids[start:start + count], slabs, request.dst_heads)
                    del slabs  # no view may outlive a later close of the mapping
            except FileNotFoundError:
                self._attached.drop(meta["segment"])
                raise
            finally:  # one-way: the segment goes back to the source's pool without a round trip
                client.send({"op": "shm_release", "lease": meta["lease"]}, request.timeout_s)
        return nbytes

    def close(self) -> None:
        self._attached.close()
        self.pool.close()
