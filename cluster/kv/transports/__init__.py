"""KV transports between engine ranks, one module each, and the factory that picks one by its
configured name:

| name | module | where |
| --- | --- | --- |
| auto | `auto.py` | shm between ranks on one host, tcp between hosts (the default) |
| shm | `shm.py` | POSIX shared memory, same host, CPU caches |
| tcp | `tcp.py` | a direct TCP stream, any host, CPU caches |
| nccl | `nccl.py` | CuPy's NCCL binding, GPU caches |

The interface and what every transport shares are in `base.py`; requests travel on the side
channel (`cluster/kv/channel.py`).
"""

from __future__ import annotations

from cluster.config import KV_TRANSPORTS
from cluster.kv.transports.auto import AutoTransport
from cluster.kv.transports.base import FetchRequest, RankTransport, SourceContext, TransferError
from cluster.kv.transports.nccl import NcclTransport
from cluster.kv.transports.shm import SharedMemoryTransport
from cluster.kv.transports.tcp import TcpTransport

__all__ = ["FetchRequest", "RankTransport", "SourceContext", "TransferError", "make_transport"]


def make_transport(name: str, host: str, rank_key: str = "") -> RankTransport:
    """The transport one rank uses, as both a source and a destination."""
    if name == "auto":
        return AutoTransport(host)
    if name == "shm":
        return SharedMemoryTransport()
    if name == "tcp":
        return TcpTransport()
    if name == "nccl":
        return NcclTransport(rank_key)
    raise ValueError(f"unknown KV transport {name!r} ({', '.join(KV_TRANSPORTS)})")
