"""The default transport: shared memory between ranks on one host (CPU caches), a TCP stream
between hosts."""

from __future__ import annotations

from cluster.kv.channel import RankClient
from cluster.kv.layout import KVCacheView
from cluster.kv.transports.base import FetchRequest, RankTransport, SourceContext
from cluster.kv.transports.shm import SharedMemoryTransport
from cluster.kv.transports.tcp import TcpTransport


class AutoTransport(RankTransport):
    name = "auto"

    def __init__(self, host: str):
        self.host = host
        self.local = SharedMemoryTransport()
        self.remote = TcpTransport()

    def source_handlers(self, ctx: SourceContext):
        return {**self.local.source_handlers(ctx), **self.remote.source_handlers(ctx)}

    def fetch(self, client: RankClient, request: FetchRequest, view: KVCacheView) -> int:
        same_host = client.endpoint.host == self.host and view.device.type == "cpu"
        return (self.local if same_host else self.remote).fetch(client, request, view)

    def close(self) -> None:
        self.local.close()
        self.remote.close()
