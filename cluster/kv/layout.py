"""A view of one engine rank's paged KV cache that reads and writes whole blocks (or a range of
KV heads of whole blocks).

vLLM keeps one tensor per attention layer, in a layout that depends on the attention backend
(CPU: [num_blocks, kv_heads, block_size, 2*head_size] with K and V pages per (block, head);
GPU flash-attention: [2, num_blocks, block_size, kv_heads, head_size]). We never interpret a
block: we find the block dimension (and, for transfers between different TP degrees, the head
dimension) of each tensor and copy byte for byte, so the same code moves KV for any model,
dtype and backend vLLM serves.

A *slab* is what a transfer carries for one layer: the layer tensor's shape with the block
dimension cut to the blocks moved and the head dimension cut to the heads moved, in the
tensor's own dimension order, contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def find_block_dim(shape: tuple[int, ...], num_blocks: int) -> int:
    """The one dimension of `shape` that has `num_blocks` entries.

    Callers pass the engine's block count; if two dimensions happen to match, the layout is
    ambiguous and we refuse rather than guess.
    """
    dims = [i for i, size in enumerate(shape) if size == num_blocks]
    if len(dims) != 1:
        raise ValueError(f"cannot locate the block dimension of KV shape {shape} "
                         f"with {num_blocks} blocks (candidates: {dims})")
    return dims[0]


def find_head_dim(shape: tuple[int, ...], block_dim: int, local_heads: int) -> int:
    """The dimension holding the rank's `local_heads` KV heads. vLLM's layouts put a K/V split of
    size 2 (if any) before the heads, so when several dimensions match, the last one is taken."""
    dims = [i for i, size in enumerate(shape) if size == local_heads and i != block_dim]
    if not dims:
        raise ValueError(f"cannot locate the KV-head dimension ({local_heads} heads) of KV shape {shape}")
    return dims[-1]


@dataclass(frozen=True)
class HeadRange:
    """Local KV heads [start, start + count) of a rank."""

    start: int
    count: int


@dataclass(frozen=True)
class LayerLayout:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_dim: int
    # None when the view was built without a head count (whole blocks only).
    head_dim: int | None = None

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One block's shape (the tensor's shape without the block dimension)."""
        return tuple(s for i, s in enumerate(self.shape) if i != self.block_dim)

    @property
    def item_size(self) -> int:
        return self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        n = 1
        for s in self.block_shape:
            n *= s
        return n * self.item_size

    def slab_shape(self, num_blocks: int, heads: HeadRange | None = None) -> tuple[int, ...]:
        shape = list(self.shape)
        shape[self.block_dim] = num_blocks
        if heads is not None:
            shape[self._head_dim()] = heads.count
        return tuple(shape)

    def slab_bytes(self, num_blocks: int, heads: HeadRange | None = None) -> int:
        n = 1
        for s in self.slab_shape(num_blocks, heads):
            n *= s
        return n * self.item_size

    def portable_shape(self) -> tuple:
        """The shape with the block and head dimensions left out: what must agree between two
        engines (of any TP degree) for their blocks to be interchangeable."""
        skip = {self.block_dim, self.head_dim}
        return tuple("*" if i in skip else s for i, s in enumerate(self.shape))

    def _head_dim(self) -> int:
        if self.head_dim is None:
            raise ValueError(f"layer {self.name}: the KV-head dimension is unknown (no head count given)")
        return self.head_dim


class KVCacheView:
    """Block-granular access to the per-layer KV tensors of one engine rank."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int, local_heads: int | None = None):
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.tensors = dict(kv_caches)
        self.num_blocks = num_blocks
        self.local_heads = local_heads
        self.layers = []
        for name, t in self.tensors.items():
            shape = tuple(t.shape)
            block_dim = find_block_dim(shape, num_blocks)
            head_dim = find_head_dim(shape, block_dim, local_heads) if local_heads else None
            self.layers.append(LayerLayout(name, shape, t.dtype, block_dim, head_dim))

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def bytes_per_block(self) -> int:
        return sum(layer.bytes_per_block for layer in self.layers)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def slab_bytes(self, num_blocks: int, heads: HeadRange | None = None) -> int:
        return sum(layer.slab_bytes(num_blocks, heads) for layer in self.layers)

    def _source(self, layer: LayerLayout, heads: HeadRange | None) -> torch.Tensor:
        tensor = self.tensors[layer.name]
        if heads is None:
            return tensor
        return tensor.narrow(layer._head_dim(), heads.start, heads.count)

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def gather(self, block_ids: list[int], heads: HeadRange | None = None,
               out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """One contiguous slab per layer holding the given blocks (and heads); written into `out`
        (tensors of the slab shapes, e.g. views of a shared-memory segment) when given."""
        runs = block_runs(block_ids)
        return [self.gather_layer(layer, block_ids, heads, None if out is None else out[i], runs)
                for i, layer in enumerate(self.layers)]

    def gather_layer(self, layer: LayerLayout, block_ids: list[int], heads: HeadRange | None = None,
                     out: torch.Tensor | None = None, runs=None) -> torch.Tensor:
        """One layer's slab of the given blocks (and heads), into `out` when given."""
        runs = block_runs(block_ids) if runs is None else runs
        source = self._source(layer, heads)
        slab = out if out is not None else torch.empty(layer.slab_shape(len(block_ids), heads), dtype=layer.dtype,
                                                       device=self.device)
        if len(runs) > MAX_RUNS:
            torch.index_select(source, layer.block_dim, self._index(block_ids), out=slab)
        else:  # few runs of consecutive blocks: one plain copy each (memcpy speed)
            for at, first, count in runs:
                slab.narrow(layer.block_dim, at, count).copy_(source.narrow(layer.block_dim, first, count))
        return slab

    def scatter(self, block_ids: list[int], slabs: list[torch.Tensor], heads: HeadRange | None = None) -> int:
        """Writes slabs made by `gather` (of a compatible engine) into the given blocks (and
        heads); returns the bytes written."""
        if len(slabs) != len(self.layers):
            raise ValueError(f"KV payload has {len(slabs)} layers, this engine has {len(self.layers)}")
        runs = block_runs(block_ids)
        return sum(self.scatter_layer(layer, block_ids, slab, heads, runs)
                   for layer, slab in zip(self.layers, slabs, strict=True))

    def scatter_layer(self, layer: LayerLayout, block_ids: list[int], slab: torch.Tensor,
                      heads: HeadRange | None = None, runs=None) -> int:
        want = layer.slab_shape(len(block_ids), heads)
        if tuple(slab.shape) != want:
            raise ValueError(f"layer {layer.name}: payload of shape {tuple(slab.shape)} does not fit "
                             f"{len(block_ids)} blocks of {want}")
        if slab.dtype != layer.dtype:
            raise ValueError(f"layer {layer.name}: payload dtype {slab.dtype} != cache dtype {layer.dtype}")
        runs = block_runs(block_ids) if runs is None else runs
        target, slab = self._source(layer, heads), slab.to(self.device)
        if len(runs) > MAX_RUNS:
            target.index_copy_(layer.block_dim, self._index(block_ids), slab)
        else:
            for at, first, count in runs:
                target.narrow(layer.block_dim, first, count).copy_(slab.narrow(layer.block_dim, at, count))
        return slab.numel() * slab.element_size()

    def layer(self, name: str) -> LayerLayout:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no KV layer {name!r} in this engine")

    def signature(self) -> tuple:
        """What two engines (of any TP degree) must share for their blocks to be interchangeable."""
        return tuple((layer.name, layer.portable_shape(), str(layer.dtype)) for layer in self.layers)


# Past this many runs of consecutive block ids, one indexed copy beats a copy per run.
MAX_RUNS = 64


def block_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in the list, first block id, length) of each run of consecutive ids. vLLM hands
    out blocks mostly in order, so a request's blocks are usually a few long runs."""
    runs: list[tuple[int, int, int]] = []
    for pos, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            at, first, count = runs[-1]
            runs[-1] = (at, first, count + 1)
        else:
            runs.append((pos, block, 1))
    return runs


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks holding `num_tokens` tokens: full blocks and the partial last one."""
    return -(-num_tokens // block_size)
