"""The rank-pair KV transport interface.

A transfer moves the blocks a source rank *holds* under a transfer id (a finished prefill's KV,
or a migration stage) into blocks of a destination rank, optionally only a range of KV heads on
each side (the two engines differ in TP degree). The destination drives it (pull): it asks the
source rank over the side channel (cluster/kv/channel.py) and writes what arrives into its own
cache. The source side of every transport is a set of side-channel handlers over a
`SourceContext` (the rank's cache and held blocks); see the package's `__init__` for the list.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

import torch

from cluster.kv.channel import Handler, RankClient
from cluster.kv.layout import HeadRange, KVCacheView


class TransferError(RuntimeError):
    pass


class SourceContext(Protocol):
    """What a transport's source-side handlers need from the rank that serves them."""

    view: KVCacheView

    def held_blocks(self, transfer_id: str, timeout_s: float) -> list[int]:
        """The blocks held under `transfer_id`, waiting (bounded) for the hold to be announced;
        raises TransferError if it is not held."""

    def count_sent(self, nbytes: int) -> None:
        """Books bytes this rank exported."""


@dataclass(frozen=True)
class FetchRequest:
    """One rank pair's share of a transfer."""

    transfer_id: str
    block_ids: list[int]  # destination blocks, in the source hold's order
    src_heads: HeadRange | None  # None: every head the source rank holds
    dst_heads: HeadRange | None  # None: every head of the destination rank
    timeout_s: float


class RankTransport(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def fetch(self, client: RankClient, request: FetchRequest, view: KVCacheView) -> int:
        """Copies the source rank's share into `view`; returns bytes. Raises TransferError,
        TimeoutError or cluster.kv.channel.ChannelError."""

    def source_handlers(self, ctx: SourceContext) -> dict[str, Handler]:
        """The side-channel requests this transport's source side answers."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional: only transports with pools override it
        """Frees pooled buffers and links."""


def heads_json(heads: HeadRange | None) -> list[int] | None:
    return None if heads is None else [heads.start, heads.count]


def heads_from_json(value) -> HeadRange | None:
    return None if value is None else HeadRange(int(value[0]), int(value[1]))


# Transfers move in chunks of about this many bytes, so that the source's gather of one chunk
# overlaps the destination's scatter of the previous one.
CHUNK_BYTES = 4 << 20


def chunk_plan(view: KVCacheView, num_blocks: int, heads: HeadRange | None,
               chunk_bytes: int = CHUNK_BYTES) -> list[list[int]]:
    """[first block position, block count, byte offset] of each chunk; each chunk's slabs (every
    layer's, back to back) start at its offset."""
    per_block = max(1, view.slab_bytes(1, heads))
    step = max(1, chunk_bytes // per_block)
    chunks, offset = [], 0
    for start in range(0, num_blocks, step):
        count = min(step, num_blocks - start)
        chunks.append([start, count, offset])
        offset += view.slab_bytes(count, heads)
    return chunks


def slab_layout(view: KVCacheView, num_blocks: int, heads: HeadRange | None, base: int = 0) -> list[list]:
    """[offset, shape, dtype] per layer of the slabs of `num_blocks` blocks packed back to back
    from byte `base`."""
    layout, offset = [], base
    for layer in view.layers:
        shape = list(layer.slab_shape(num_blocks, heads))
        layout.append([offset, shape, str(layer.dtype).removeprefix("torch.")])
        offset += layer.slab_bytes(num_blocks, heads)
    return layout


def slab_views(buffer, layout: list[list]) -> list[torch.Tensor]:
    """Tensors over `buffer` (anything exposing the buffer protocol) for a `slab_layout`."""
    views = []
    for offset, shape, dtype in layout:
        dt = getattr(torch, dtype)
        count = 1
        for s in shape:
            count *= s
        nbytes = count * dt.itemsize
        views.append(torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
                     .view(dt).reshape(shape))
    return views


def check_layout(view: KVCacheView, request: FetchRequest, num_blocks: int, layout: list[list]) -> None:
    """The source's slabs must be exactly what the destination's blocks (and heads) take."""
    if num_blocks != len(request.block_ids):
        raise TransferError(f"{request.transfer_id}: the source holds {num_blocks} blocks, "
                            f"{len(request.block_ids)} expected")
    want = slab_layout(view, num_blocks, request.dst_heads)
    if [(s, d) for _, s, d in layout] != [(s, d) for _, s, d in want]:
        raise TransferError(f"{request.transfer_id}: KV layout mismatch (model, dtype, block size or "
                            "heads differ between the engines)")
