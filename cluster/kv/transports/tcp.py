"""Cross-host KV transport on CPUs: the source rank gathers the held blocks (and heads), chunk by
chunk, into a pooled buffer and streams each chunk on the side channel's connection without
another copy; the destination receives each chunk straight into a pooled buffer and scatters it
while the next one is on the wire. One request; the bytes flow at TCP speed, not through Ray's
object store (which vLLM's rank processes cannot use: they are not Ray workers)."""

from __future__ import annotations

import threading

import torch

from cluster.kv.channel import RankClient, send_frame
from cluster.kv.layout import KVCacheView
from cluster.kv.transports.base import (
    FetchRequest,
    RankTransport,
    SourceContext,
    TransferError,
    check_layout,
    chunk_plan,
    heads_from_json,
    heads_json,
    slab_layout,
    slab_views,
)


class _Buffers:
    """Reusable byte buffers, one per thread (loader and server threads each move one transfer
    at a time), grown to the largest transfer seen."""

    def __init__(self):
        self._local = threading.local()

    def get(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        return buf[:nbytes]


class TcpTransport(RankTransport):
    name = "tcp"

    def __init__(self):
        self._send = _Buffers()
        self._recv = _Buffers()

    def source_handlers(self, ctx: SourceContext):
        def export(request: dict, conn):
            heads = heads_from_json(request.get("heads"))
            blocks = ctx.held_blocks(request["transfer_id"], float(request["timeout_s"]))
            nbytes = ctx.view.slab_bytes(len(blocks), heads)
            chunks = chunk_plan(ctx.view, len(blocks), heads)
            send_frame(conn, {"num_blocks": len(blocks), "chunks": chunks,
                              "layout": slab_layout(ctx.view, len(blocks), heads)})
            buf = self._send.get(nbytes)
            for start, count, offset in chunks:
                size = ctx.view.slab_bytes(count, heads)
                region = buf[offset:offset + size].numpy()
                out = slab_views(region, slab_layout(ctx.view, count, heads))
                ctx.view.gather(blocks[start:start + count], heads, out=out)
                # The kernel sends this chunk while we gather the next one.
                send_frame(conn, {"nbytes": size}, memoryview(region))
            ctx.count_sent(nbytes)
            return None  # replied with the payload already

        return {"tcp_export": export}

    def fetch(self, client: RankClient, request: FetchRequest, view: KVCacheView) -> int:
        nbytes = 0
        with client.lock:
            meta = client.call({"op": "tcp_export", "transfer_id": request.transfer_id,
                                "heads": heads_json(request.src_heads), "timeout_s": request.timeout_s},
                               request.timeout_s)
            check_layout(view, request, meta["num_blocks"], meta["layout"])
            buf = self._recv.get(view.slab_bytes(len(request.block_ids), request.dst_heads))
            for start, count, offset in meta["chunks"]:
                size = view.slab_bytes(count, request.dst_heads)
                region = buf[offset:offset + size].numpy()
                header = client.recv(request.timeout_s, into=lambda _h, region=region: region)
                if int(header.get("nbytes", -1)) != size:
                    raise TransferError(f"{request.transfer_id}: chunk of {header.get('nbytes')} bytes, "
                                        f"{size} expected")
                slabs = slab_views(region, slab_layout(view, count, request.dst_heads))
                nbytes += view.scatter(request.block_ids[start:start + count], slabs, request.dst_heads)
        return nbytes
