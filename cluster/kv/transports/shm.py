"""Same-host KV transport through POSIX shared memory.

The source gathers the request's blocks straight into a shared-memory segment (one copy, in
the cache's own layout) and hands back only the segment's name and the slab offsets; the
destination maps the segment and scatters the blocks into its cache (the second copy). No
serialization, no object store. Segments are pooled and pre-faulted on the source, so a
transfer does not pay for fresh pages; the destination's release of the transfer returns
its segment to the pool. Across hosts the object-store transport is used instead.
"""

from __future__ import annotations

import threading
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch

from cluster.kv.layout import KVCacheView
from cluster.kv.transports.base import KVTransport, SourceRef, TransferError, ask_source

MIN_SEGMENT_BYTES = 64 << 20


def _prefaulted(nbytes: int) -> shared_memory.SharedMemory:
    """A new segment with its pages faulted in now, not during a transfer. numpy writes the
    zeros without holding the GIL, so the engine thread in this process keeps stepping."""
    seg = shared_memory.SharedMemory(create=True, size=nbytes)
    pages = np.frombuffer(seg.buf, dtype=np.uint8)
    pages[:] = 0
    del pages  # no view may outlive the segment's close()
    return seg


class ShmPool:
    """Source side: pre-faulted segments lent to one transfer at a time."""

    def __init__(self):
        self._free: list[shared_memory.SharedMemory] = []
        self._lent: dict[str, shared_memory.SharedMemory] = {}
        self._lock = threading.Lock()

    def lend(self, transfer_id: str, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
            else:
                seg = _prefaulted(max(nbytes, MIN_SEGMENT_BYTES))
            self._lent[transfer_id] = seg
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

    def give_back(self, transfer_id: str) -> None:
        with self._lock:
            seg = self._lent.pop(transfer_id, None)
            if seg is not None:
                self._free.append(seg)

    def close(self) -> None:
        with self._lock:
            for seg in self._free + list(self._lent.values()):
                seg.close()
                seg.unlink()
            self._free.clear()
            self._lent.clear()


def _slab_view(buf, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).reshape(shape)


def export_to_shm(pool: ShmPool, transfer_id: str, cache: KVCacheView, block_ids: list[int]) -> dict:
    """Gathers `block_ids` of every layer into a pooled segment; returns where they are."""
    n = len(block_ids)
    shapes = []
    for layer in cache.layers:
        shape = list(layer.shape)
        shape[layer.block_dim] = n
        shapes.append(tuple(shape))
    sizes = [n * layer.bytes_per_block for layer in cache.layers]
    seg = pool.lend(transfer_id, sum(sizes))
    index = torch.tensor(block_ids, dtype=torch.long)
    layers, offset = [], 0
    for layer, shape, size in zip(cache.layers, shapes, sizes, strict=True):
        out = _slab_view(seg.buf, offset, shape, layer.dtype)
        torch.index_select(cache.tensors[layer.name], layer.block_dim, index, out=out)
        layers.append((offset, shape, str(layer.dtype).removeprefix("torch.")))
        offset += size
    return {"segment": seg.name, "layers": layers, "signature": cache.signature(), "num_blocks": n}


def _scatter_from(seg, meta: dict, cache: KVCacheView, block_ids: list[int]) -> int:
    index = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
    total = 0
    for layer, (offset, shape, dtype) in zip(cache.layers, meta["layers"], strict=True):
        slab = _slab_view(seg.buf, offset, shape, getattr(torch, dtype))
        cache.tensors[layer.name].index_copy_(layer.block_dim, index, slab.to(cache.device))
        total += slab.numel() * slab.element_size()
    return total


class SharedMemoryTransport(KVTransport):
    name = "shm"

    def fetch(self, source: SourceRef, transfer_id: str, cache: KVCacheView, block_ids: list[int],
              timeout_s: float) -> int:
        meta = ask_source(source.actor.kv_export_shm.remote(transfer_id), transfer_id, cache, timeout_s)
        if meta["num_blocks"] != len(block_ids):
            raise TransferError(f"{transfer_id}: source exported {meta['num_blocks']} blocks, "
                                f"{len(block_ids)} expected")
        seg = shared_memory.SharedMemory(name=meta["segment"])
        # Attaching registers the segment with this process's tracker, which would unlink it
        # at exit; the source owns it.
        resource_tracker.unregister(seg._name, "shared_memory")
        try:
            return _scatter_from(seg, meta, cache, block_ids)
        finally:
            seg.close()  # the views into it are gone by now
