"""GPU KV transport over NCCL through CuPy's binding (`cupy.cuda.nccl`).

One 2-rank communicator per (source rank, destination rank) pair, created lazily on their first
transfer: the destination makes the NCCL unique id and sends it over the side channel; both
ranks join at once. Each transfer sends one contiguous slab per layer (the held blocks, and
heads, gathered on the source GPU), all in one NCCL group, on a dedicated CUDA stream so the
engine's compute stream keeps running. A one-GPU machine exercises the same code with a
1-rank communicator that sends to itself (`loopback`, used by the GPU check).

CuPy is imported only when a link is made: the module loads on machines without it.
"""

from __future__ import annotations

import threading
import time

import torch

from cluster.kv.channel import RankClient
from cluster.kv.layout import HeadRange, KVCacheView
from cluster.kv.transports.base import (
    FetchRequest,
    RankTransport,
    SourceContext,
    TransferError,
    check_layout,
    heads_from_json,
    heads_json,
    slab_layout,
)

SOURCE_RANK, DEST_RANK = 0, 1


def _nccl():
    try:
        from cupy.cuda import nccl  # heavy optional dependency (the gpu extra)
    except ImportError as exc:
        raise TransferError("the nccl transport needs CuPy with NCCL (pip install 'disagg-serve[gpu]')") from exc
    return nccl


def _wait_stream(stream: torch.cuda.Stream, timeout_s: float, comm) -> None:
    """Waits for the stream with a deadline; a stuck peer aborts the communicator."""
    deadline = time.monotonic() + timeout_s
    while not stream.query():
        if time.monotonic() > deadline:
            comm.abort()
            raise TimeoutError(f"NCCL transfer did not complete within {timeout_s:.1f}s")
        time.sleep(0.0005)


class NcclLink:
    """A communicator between two ranks (or one rank and itself)."""

    def __init__(self, comm, rank: int, peer: int, device: torch.device):
        self.comm = comm
        self.rank = rank
        self.peer = peer
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.lock = threading.Lock()  # one transfer at a time per link keeps both sides in step

    @classmethod
    def create(cls, nranks: int, unique_id, rank: int, peer: int, device: torch.device) -> NcclLink:
        nccl = _nccl()
        with torch.cuda.device(device):
            comm = nccl.NcclCommunicator(nranks, tuple(unique_id), rank)
        return cls(comm, rank, peer, device)

    def send(self, slabs: list[torch.Tensor], timeout_s: float) -> None:
        nccl = _nccl()
        with self.lock, torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            nccl.groupStart()
            for slab in slabs:
                self.comm.send(slab.data_ptr(), slab.numel() * slab.element_size(), nccl.NCCL_UINT8,
                               self.peer, self.stream.cuda_stream)
            nccl.groupEnd()
        _wait_stream(self.stream, timeout_s, self.comm)

    def recv(self, buffers: list[torch.Tensor], timeout_s: float) -> None:
        nccl = _nccl()
        with self.lock, torch.cuda.stream(self.stream):
            nccl.groupStart()
            for buf in buffers:
                self.comm.recv(buf.data_ptr(), buf.numel() * buf.element_size(), nccl.NCCL_UINT8,
                               self.peer, self.stream.cuda_stream)
            nccl.groupEnd()
        _wait_stream(self.stream, timeout_s, self.comm)

    def send_recv_self(self, slabs: list[torch.Tensor], buffers: list[torch.Tensor], timeout_s: float) -> None:
        """Loopback on a one-rank communicator: sends and receives in one group."""
        nccl = _nccl()
        with self.lock, torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            nccl.groupStart()
            for slab, buf in zip(slabs, buffers, strict=True):
                n = slab.numel() * slab.element_size()
                self.comm.send(slab.data_ptr(), n, nccl.NCCL_UINT8, 0, self.stream.cuda_stream)
                self.comm.recv(buf.data_ptr(), n, nccl.NCCL_UINT8, 0, self.stream.cuda_stream)
            nccl.groupEnd()
        _wait_stream(self.stream, timeout_s, self.comm)


def allocate_slabs(view: KVCacheView, num_blocks: int, heads: HeadRange | None) -> list[torch.Tensor]:
    return [torch.empty(layer.slab_shape(num_blocks, heads), dtype=layer.dtype, device=view.device)
            for layer in view.layers]


class NcclTransport(RankTransport):
    name = "nccl"

    def __init__(self, rank_key: str = ""):
        self.rank_key = rank_key  # this rank's identity in link keys
        self._links: dict[str, NcclLink] = {}
        self._lock = threading.Lock()

    # ---- source side ----
    def source_handlers(self, ctx: SourceContext):
        def join(request: dict, _conn):
            if [list(x) for x in request["signature"]] != [list(x) for x in _json_signature(ctx.view)]:
                raise TransferError("the destination's KV layout differs from this engine's")
            self._links[request["key"]] = NcclLink.create(2, request["unique_id"], SOURCE_RANK, DEST_RANK,
                                                          ctx.view.device)
            return {"joined": True}

        def send(request: dict, _conn):
            link = self._links.get(request["key"])
            if link is None:
                raise TransferError(f"no NCCL link {request['key']}")
            heads = heads_from_json(request.get("heads"))
            blocks = ctx.held_blocks(request["transfer_id"], float(request["timeout_s"]))
            link.send(ctx.view.gather(blocks, heads), float(request["timeout_s"]))
            ctx.count_sent(ctx.view.slab_bytes(len(blocks), heads))
            return {"num_blocks": len(blocks), "layout": slab_layout(ctx.view, len(blocks), heads)}

        return {"nccl_join": join, "nccl_send": send}

    # ---- destination side ----
    def _link(self, client: RankClient, view: KVCacheView, timeout_s: float) -> tuple[str, NcclLink]:
        key = f"{client.endpoint}->{self.rank_key}"
        with self._lock:
            link = self._links.get(key)
            if link is not None:
                return key, link
            unique_id = _nccl().get_unique_id()
            reply: dict = {}
            # Both ranks must join at once: the source joins in its side-channel thread meanwhile.
            asker = threading.Thread(target=lambda: reply.update(client.call(
                {"op": "nccl_join", "key": key, "unique_id": list(unique_id),
                 "signature": _json_signature(view)}, timeout_s)), daemon=True)
            asker.start()
            link = NcclLink.create(2, unique_id, DEST_RANK, SOURCE_RANK, view.device)
            asker.join(timeout_s)
            if not reply.get("joined"):
                raise TransferError(f"{client.endpoint} did not join the NCCL pair {key}")
            self._links[key] = link
            return key, link

    def fetch(self, client: RankClient, request: FetchRequest, view: KVCacheView) -> int:
        with client.lock:
            key, link = self._link(client, view, request.timeout_s)
            buffers = allocate_slabs(view, len(request.block_ids), request.dst_heads)
            reply: dict = {}
            errors: list[BaseException] = []

            def ask():
                try:
                    reply.update(client.call({"op": "nccl_send", "key": key, "transfer_id": request.transfer_id,
                                              "heads": heads_json(request.src_heads),
                                              "timeout_s": request.timeout_s}, request.timeout_s))
                except BaseException as exc:  # noqa: BLE001 - re-raised below on the caller's thread
                    errors.append(exc)

            asker = threading.Thread(target=ask, daemon=True)
            asker.start()
            link.recv(buffers, request.timeout_s)
            asker.join(request.timeout_s)
            if errors:
                raise errors[0]
        check_layout(view, request, reply["num_blocks"], reply["layout"])
        nbytes = view.scatter(request.block_ids, buffers, request.dst_heads)
        torch.cuda.current_stream(view.device).synchronize()
        return nbytes


def _json_signature(view: KVCacheView) -> list:
    return [[name, list(shape), dtype] for name, shape, dtype in view.signature()]


def loopback(view: KVCacheView, src_blocks: list[int], dst_blocks: list[int], timeout_s: float = 30.0) -> int:
    """Copies blocks within one rank through a one-rank communicator (the GPU check)."""
    nccl = _nccl()
    link = NcclLink.create(1, nccl.get_unique_id(), 0, 0, view.device)
    slabs = view.gather(src_blocks)
    buffers = allocate_slabs(view, len(src_blocks), None)
    link.send_recv_self(slabs, buffers, timeout_s)
    nbytes = view.scatter(dst_blocks, buffers)
    torch.cuda.current_stream(view.device).synchronize()
    return nbytes
