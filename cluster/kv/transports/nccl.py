"""GPU KV transport over NCCL through CuPy's binding (`cupy.cuda.nccl`).

One communicator per (source, destination) pair of engines, created lazily on the first
transfer between them: the destination makes the NCCL unique id and hands it to the source
through a Ray call; both ranks then join. Each transfer sends one contiguous slab per layer
(the request's blocks gathered on the source GPU), all in one NCCL group, on a dedicated CUDA
stream so the engine's compute stream keeps running. A source and destination in the same
process (one GPU) use a one-rank communicator that sends to itself.

Layer-wise overlap with prefill (Splitwise) is not done: the connector hands off after the
prefill finishes, so the whole request moves at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import ray
import torch

from cluster.kv.layout import KVCacheView, LayerLayout
from cluster.kv.transports.base import KVTransport, SourceRef, TransferError

SOURCE_RANK, DEST_RANK = 0, 1


@dataclass(frozen=True)
class SlabPlan:
    """One layer's contiguous slab of `num_blocks` blocks."""

    layer: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def plan_transfer(layers: list[LayerLayout], num_blocks: int) -> list[SlabPlan]:
    """What crosses the wire for `num_blocks` blocks, layer by layer, in a fixed order both
    ranks agree on (the order of the engine's KV tensors)."""
    plans = []
    for layer in layers:
        shape = (num_blocks, *layer.block_shape)
        plans.append(SlabPlan(layer.name, shape, layer.dtype, num_blocks * layer.bytes_per_block))
    return plans


def pair_key(source_id: str, dest_id: str) -> str:
    return f"{source_id}->{dest_id}"


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as exc:  # the gpu extra is not installed
        raise TransferError("the nccl transport needs CuPy with NCCL (pip install 'disagg-serve[gpu]')") from exc
    return nccl


class NcclLink:
    """A communicator between two engines (or one engine and itself)."""

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
            comm = nccl.NcclCommunicator(nranks, unique_id, rank)
        return cls(comm, rank, peer, device)

    def send(self, slabs: list[torch.Tensor]) -> None:
        nccl = _nccl()
        with self.lock, torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            nccl.groupStart()
            for slab in slabs:
                self.comm.send(slab.data_ptr(), slab.numel() * slab.element_size(), nccl.NCCL_UINT8,
                               self.peer, self.stream.cuda_stream)
            nccl.groupEnd()
        self.stream.synchronize()

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


def _wait_stream(stream: torch.cuda.Stream, timeout_s: float, comm) -> None:
    """Waits for the stream with a deadline; a stuck peer aborts the communicator."""
    deadline = time.monotonic() + timeout_s
    while not stream.query():
        if time.monotonic() > deadline:
            comm.abort()
            raise TimeoutError(f"NCCL transfer did not complete within {timeout_s:.1f}s")
        time.sleep(0.0005)


def allocate_buffers(plans: list[SlabPlan], device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(p.shape, dtype=p.dtype, device=device) for p in plans]


class NcclTransport(KVTransport):
    """Destination side; the source side is `NcclSource`, owned by the source's agent."""

    name = "nccl"

    def __init__(self, instance_id: str = ""):
        self.instance_id = instance_id
        self._links: dict[str, NcclLink] = {}
        self._lock = threading.Lock()

    def _link(self, source, source_id: str, cache: KVCacheView, timeout_s: float) -> NcclLink:
        key = pair_key(source_id, self.instance_id)
        with self._lock:
            link = self._links.get(key)
            if link is not None:
                return link
            nccl = _nccl()
            unique_id = nccl.get_unique_id()
            # Both ranks must join at once: the source joins in its actor thread meanwhile.
            joined = source.kv_nccl_join.remote(key, unique_id, cache.signature())
            link = NcclLink.create(2, unique_id, DEST_RANK, SOURCE_RANK, cache.device)
            ray.get(joined, timeout=timeout_s)
            self._links[key] = link
            return link

    def fetch(self, source: SourceRef, transfer_id: str, cache: KVCacheView, block_ids: list[int],
              timeout_s: float) -> int:
        source_id, handle = source.instance_id, source.actor
        link = self._link(handle, source_id, cache, timeout_s)
        plans = plan_transfer(cache.layers, len(block_ids))
        buffers = allocate_buffers(plans, cache.device)
        sent = handle.kv_nccl_send.remote(pair_key(source_id, self.instance_id), transfer_id)
        link.recv(buffers, timeout_s)
        ok = ray.get(sent, timeout=timeout_s)
        if not ok:
            raise TransferError(f"KV source holds no blocks for {transfer_id}")
        cache.write_blocks(block_ids, buffers)
        torch.cuda.current_stream(cache.device).synchronize()
        return sum(p.nbytes for p in plans)


class NcclSource:
    """Source side: joins communicators and sends held blocks when a destination asks."""

    def __init__(self):
        self._links: dict[str, NcclLink] = {}

    def join(self, key: str, unique_id, signature, cache: KVCacheView) -> bool:
        if signature != cache.signature():
            raise TransferError(f"{key}: the destination's KV layout differs from this engine's")
        self._links[key] = NcclLink.create(2, unique_id, SOURCE_RANK, DEST_RANK, cache.device)
        return True

    def send(self, key: str, cache: KVCacheView, block_ids: list[int]) -> None:
        link = self._links.get(key)
        if link is None:
            raise TransferError(f"no NCCL link {key}")
        link.send(cache.read_blocks(block_ids))

    @staticmethod
    def loopback(cache: KVCacheView, src_blocks: list[int], dst_blocks: list[int],
                 timeout_s: float = 30.0) -> int:
        """Copies blocks within one engine through a one-rank communicator (GPU self-test)."""
        nccl = _nccl()
        link = NcclLink.create(1, nccl.get_unique_id(), 0, 0, cache.device)
        slabs = cache.read_blocks(src_blocks)
        buffers = allocate_buffers(plan_transfer(cache.layers, len(src_blocks)), cache.device)
        link.send_recv_self(slabs, buffers, timeout_s)
        cache.write_blocks(dst_blocks, buffers)
        torch.cuda.current_stream(cache.device).synchronize()
        return sum(b.numel() * b.element_size() for b in buffers)
