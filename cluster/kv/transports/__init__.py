"""KV transports, one module each, and the factory that picks one by its configured name:

| name | module | where |
| --- | --- | --- |
| auto | `auto.py` | shm on one host, object store across hosts (the default) |
| shm | `shm.py` | POSIX shared memory, same host, CPU caches |
| ray | `object_store.py` | Ray's object store, any host, CPU caches |
| nccl | `nccl.py` | CuPy's NCCL binding, GPU caches |

The interface and the helpers every transport shares are in `base.py`.
"""

from __future__ import annotations

from cluster.config import KV_TRANSPORTS
from cluster.kv.transports.auto import AutoTransport
from cluster.kv.transports.base import KVTransport, SourceRef, TransferError
from cluster.kv.transports.nccl import NcclTransport
from cluster.kv.transports.object_store import RayObjectTransport
from cluster.kv.transports.shm import SharedMemoryTransport

__all__ = ["KVTransport", "SourceRef", "TransferError", "make_transport"]


def make_transport(name: str, instance_id: str, node_id: str | None = None) -> KVTransport:
    """The transport a worker's agent uses to pull KV (nccl imports CuPy only when used)."""
    if name == "auto":
        return AutoTransport(node_id)
    if name == "shm":
        return SharedMemoryTransport()
    if name == "ray":
        return RayObjectTransport()
    if name == "nccl":
        return NcclTransport(instance_id)
    raise ValueError(f"unknown KV transport {name!r} ({', '.join(KV_TRANSPORTS)})")
