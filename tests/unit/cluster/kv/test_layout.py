import pytest
import torch

from cluster.kv.layout import KVCacheView, blocks_for_tokens, find_block_dim
from cluster.kv.transports.base import tensor_from_wire, tensor_to_wire
from cluster.kv.transports.nccl import pair_key, plan_transfer

NUM_BLOCKS = 9


def cpu_layout(dtype=torch.float32):
    # [num_blocks, kv_heads, block_size, 2*head_size], as vLLM's CPU backend.
    return {f"model.layers.{i}.self_attn.attn": torch.randn(NUM_BLOCKS, 2, 16, 2 * 8).to(dtype)
            for i in range(3)}


def gpu_layout():
    # [2, num_blocks, block_size, kv_heads, head_size], as flash-attention's.
    return {f"model.layers.{i}.self_attn.attn": torch.randn(2, NUM_BLOCKS, 16, 2, 8) for i in range(2)}


def test_blocks_for_tokens_counts_partial_block():
    assert [blocks_for_tokens(n, 16) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]


def test_find_block_dim():
    assert find_block_dim((9, 2, 16, 16), 9) == 0
    assert find_block_dim((2, 9, 16, 2, 8), 9) == 1
    with pytest.raises(ValueError):
        find_block_dim((9, 9, 16), 9)  # ambiguous: refuse to guess
    with pytest.raises(ValueError):
        find_block_dim((4, 2), 9)


@pytest.mark.parametrize("make", [cpu_layout, gpu_layout, lambda: cpu_layout(torch.bfloat16)])
def test_blocks_move_byte_for_byte_between_engines(make):
    src, dst = KVCacheView(make(), NUM_BLOCKS), KVCacheView(make(), NUM_BLOCKS)
    assert src.signature() == dst.signature()
    src_blocks, dst_blocks = [4, 1, 7], [0, 8, 2]
    slabs = src.read_blocks(src_blocks)
    before = {n: t.clone() for n, t in dst.tensors.items()}
    dst.write_blocks(dst_blocks, slabs)
    for layer in src.layers:
        s, d = src.tensors[layer.name], dst.tensors[layer.name]
        for a, b in zip(src_blocks, dst_blocks, strict=True):
            assert torch.equal(s.select(layer.block_dim, a), d.select(layer.block_dim, b))
        untouched = [i for i in range(NUM_BLOCKS) if i not in dst_blocks]
        for i in untouched:
            assert torch.equal(before[layer.name].select(layer.block_dim, i), d.select(layer.block_dim, i))


def test_write_rejects_mismatched_payloads():
    view = KVCacheView(cpu_layout(), NUM_BLOCKS)
    slabs = view.read_blocks([0, 1])
    with pytest.raises(ValueError, match="layers"):
        view.write_blocks([0, 1], slabs[:1])
    with pytest.raises(ValueError, match="do not fit"):
        view.write_blocks([0], slabs)
    with pytest.raises(ValueError, match="dtype"):
        view.write_blocks([0, 1], [s.to(torch.float16) for s in slabs])


def test_wire_round_trip_keeps_dtype_and_bytes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(3, 4, 5).to(dtype)
        back = tensor_from_wire(*tensor_to_wire(t))
        assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_nccl_plan_matches_layout():
    view = KVCacheView(gpu_layout(), NUM_BLOCKS)
    plans = plan_transfer(view.layers, 3)
    assert [p.layer for p in plans] == view.layer_names
    assert all(p.shape == (3, 2, 16, 2, 8) for p in plans)
    assert sum(p.nbytes for p in plans) == 3 * view.bytes_per_block
    assert pair_key("prefill-0", "decode-1") == "prefill-0->decode-1"


@pytest.mark.parametrize("make", [cpu_layout, gpu_layout, lambda: cpu_layout(torch.bfloat16)])
def test_shared_memory_export_and_scatter(make):
    from multiprocessing import shared_memory

    from cluster.kv.transports.shm import ShmPool, _scatter_from, export_to_shm

    src, dst = KVCacheView(make(), NUM_BLOCKS), KVCacheView(make(), NUM_BLOCKS)
    pool = ShmPool()
    try:
        meta = export_to_shm(pool, "t1", src, [3, 5])
        seg = shared_memory.SharedMemory(name=meta["segment"])
        try:
            assert _scatter_from(seg, meta, dst, [8, 0]) == 2 * src.bytes_per_block
        finally:
            seg.close()
        for layer in src.layers:
            s, d = src.tensors[layer.name], dst.tensors[layer.name]
            assert torch.equal(s.select(layer.block_dim, 3), d.select(layer.block_dim, 8))
            assert torch.equal(s.select(layer.block_dim, 5), d.select(layer.block_dim, 0))
        pool.give_back("t1")
        again = export_to_shm(pool, "t2", src, [1])  # the segment is reused, not reallocated
        assert again["segment"] == meta["segment"]
    finally:
        pool.close()
