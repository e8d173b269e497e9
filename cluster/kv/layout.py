"""A view of one engine's paged KV cache that reads and writes whole blocks.

vLLM keeps one tensor per attention layer, in a layout that depends on the attention backend
(CPU: [num_blocks, kv_heads, block_size, 2*head_size] with K transposed inside a block;
GPU flash-attention: [2, num_blocks, block_size, kv_heads, head_size]). We never interpret a
block: we find the block dimension of each tensor and copy blocks byte for byte, so the same
code moves KV for any model, dtype and backend vLLM serves.
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


@dataclass(frozen=True)
class LayerLayout:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_dim: int

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of the slab of `n` blocks is this with `n` at block_dim."""
        return tuple(s for i, s in enumerate(self.shape) if i != self.block_dim)

    @property
    def bytes_per_block(self) -> int:
        n = 1
        for s in self.block_shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class KVCacheView:
    """Block-granular access to the per-layer KV tensors of one engine."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int):
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.tensors = dict(kv_caches)
        self.num_blocks = num_blocks
        self.layers = [LayerLayout(name, tuple(t.shape), t.dtype, find_block_dim(tuple(t.shape), num_blocks))
                       for name, t in self.tensors.items()]

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def bytes_per_block(self) -> int:
        return sum(layer.bytes_per_block for layer in self.layers)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Copies of the given blocks, one contiguous tensor per layer (blocks along dim 0)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        out = []
        for layer in self.layers:
            picked = self.tensors[layer.name].index_select(layer.block_dim, index)
            out.append(picked.movedim(layer.block_dim, 0).contiguous())
        return out

    def write_blocks(self, block_ids: list[int], slabs: list[torch.Tensor]) -> None:
        """Writes slabs made by `read_blocks` (of a compatible engine) into the given blocks."""
        if len(slabs) != len(self.layers):
            raise ValueError(f"KV payload has {len(slabs)} layers, this engine has {len(self.layers)}")
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for layer, slab in zip(self.layers, slabs, strict=True):
            if tuple(slab.shape[1:]) != layer.block_shape or slab.shape[0] != len(block_ids):
                raise ValueError(f"layer {layer.name}: payload blocks of shape {tuple(slab.shape)} do not "
                                 f"fit {len(block_ids)} blocks of {layer.block_shape}")
            if slab.dtype != layer.dtype:
                raise ValueError(f"layer {layer.name}: payload dtype {slab.dtype} != cache dtype {layer.dtype}")
            target = self.tensors[layer.name]
            target.index_copy_(layer.block_dim, index, slab.to(target.device).movedim(0, layer.block_dim))

    def signature(self) -> tuple:
        """What two engines must share for their blocks to be interchangeable."""
        return tuple((layer.name, layer.block_shape, str(layer.dtype)) for layer in self.layers)


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks holding `num_tokens` tokens: full blocks and the partial last one."""
    return -(-num_tokens // block_size)
