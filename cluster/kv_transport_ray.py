"""CPU KV transport through Ray's object store.

The source copies the request's blocks into one numpy byte array per layer; Ray keeps them in
its shared-memory object store, so on one host the destination maps them without another
copy, and across hosts Ray streams them between object stores. No extra sockets, no extra
ports, and Ray's own deadlines and failure detection apply.
"""

from __future__ import annotations

import ray

from cluster.kv_layout import KVCacheView
from cluster.kv_transport import KVTransport, SourceRef, TransferError, tensor_from_wire


class RayObjectTransport(KVTransport):
    name = "ray"

    def fetch(self, source: SourceRef, transfer_id: str, cache: KVCacheView, block_ids: list[int],
              timeout_s: float) -> int:
        try:
            payload = ray.get(source.actor.kv_export.remote(transfer_id), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise TimeoutError(f"KV of {transfer_id} not received within {timeout_s:.1f}s") from exc
        except ray.exceptions.RayError as exc:
            raise TransferError(f"KV source failed for {transfer_id}: {exc}") from exc
        if payload is None:
            raise TransferError(f"KV source holds no blocks for {transfer_id}")
        if payload["signature"] != cache.signature():
            raise TransferError(f"KV layout mismatch for {transfer_id}: the source engine's cache "
                                "differs from this engine's (model, dtype or block size)")
        slabs = [tensor_from_wire(*layer) for layer in payload["layers"]]
        if slabs and slabs[0].shape[0] != len(block_ids):
            raise TransferError(f"{transfer_id}: source sent {slabs[0].shape[0]} blocks, "
                                f"{len(block_ids)} expected")
        cache.write_blocks(block_ids, slabs)
        return sum(s.numel() * s.element_size() for s in slabs)
