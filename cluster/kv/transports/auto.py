"""The default transport: shared memory when source and destination share a host (and a CPU
cache), Ray's object store otherwise."""

from __future__ import annotations

from cluster.kv.layout import KVCacheView
from cluster.kv.transports.base import KVTransport, SourceRef
from cluster.kv.transports.object_store import RayObjectTransport
from cluster.kv.transports.shm import SharedMemoryTransport


class AutoTransport(KVTransport):
    """Shared memory when source and destination share a host, Ray's object store otherwise."""

    name = "auto"

    def __init__(self, node_id: str | None):
        self.node_id = node_id
        self.local = SharedMemoryTransport()
        self.remote = RayObjectTransport()

    def fetch(self, source: SourceRef, transfer_id: str, cache: KVCacheView, block_ids: list[int],
              timeout_s: float) -> int:
        same_host = source.node_id is not None and source.node_id == self.node_id
        transport = self.local if same_host and cache.device.type == "cpu" else self.remote
        return transport.fetch(source, transfer_id, cache, block_ids, timeout_s)
