"""CPU KV transport through Ray's object store.

The source copies the request's blocks into one numpy byte array per layer; Ray keeps them in
its shared-memory object store, so on one host the destination maps them without another
copy, and across hosts Ray streams them between object stores. No extra sockets, no extra
ports, and Ray's own deadlines and failure detection apply.
"""

from __future__ import annotations

from cluster.kv.layout import KVCacheView
from cluster.kv.transports.base import KVTransport, SourceRef, TransferError, ask_source, tensor_from_wire


class RayObjectTransport(KVTransport):
    name = "ray"

    def fetch(self, source: SourceRef, transfer_id: str, cache: KVCacheView, block_ids: list[int],
              timeout_s: float) -> int:
        payload = ask_source(source.actor.kv_export.remote(transfer_id), transfer_id, cache, timeout_s)
        slabs = [tensor_from_wire(*layer) for layer in payload["layers"]]
        if slabs and slabs[0].shape[0] != len(block_ids):
            raise TransferError(f"{transfer_id}: source sent {slabs[0].shape[0]} blocks, "
                                f"{len(block_ids)} expected")
        cache.write_blocks(block_ids, slabs)
        return sum(s.numel() * s.element_size() for s in slabs)
