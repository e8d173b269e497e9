import pytest
import torch

from cluster.kv.layout import HeadRange, KVCacheView, blocks_for_tokens, find_block_dim, find_head_dim

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
    slabs = src.gather(src_blocks)
    before = {n: t.clone() for n, t in dst.tensors.items()}
    assert dst.scatter(dst_blocks, slabs) == 3 * src.bytes_per_block
    for layer in src.layers:
        s, d = src.tensors[layer.name], dst.tensors[layer.name]
        for a, b in zip(src_blocks, dst_blocks, strict=True):
            assert torch.equal(s.select(layer.block_dim, a), d.select(layer.block_dim, b))
        untouched = [i for i in range(NUM_BLOCKS) if i not in dst_blocks]
        for i in untouched:
            assert torch.equal(before[layer.name].select(layer.block_dim, i), d.select(layer.block_dim, i))


def test_write_rejects_mismatched_payloads():
    view = KVCacheView(cpu_layout(), NUM_BLOCKS)
    slabs = view.gather([0, 1])
    with pytest.raises(ValueError, match="layers"):
        view.scatter([0, 1], slabs[:1])
    with pytest.raises(ValueError, match="does not fit"):
        view.scatter([0], slabs)
    with pytest.raises(ValueError, match="dtype"):
        view.scatter([0, 1], [s.to(torch.float16) for s in slabs])


def test_head_dimension_per_layout():
    assert find_head_dim((9, 2, 16, 16), 0, 2) == 1  # CPU: [blocks, heads, block_size, 2*head_size]
    assert find_head_dim((2, 9, 16, 2, 8), 1, 2) == 3  # GPU: the K/V split of 2 comes first
    with pytest.raises(ValueError):
        find_head_dim((9, 4, 16, 16), 0, 2)


@pytest.mark.parametrize("make", [cpu_layout, gpu_layout])
def test_head_ranges_move_only_their_heads(make):
    """TP2 -> TP1: each source rank's one head lands in its half of the destination's blocks."""
    full = make()
    halves = [{name: t.narrow(KVCacheView(full, NUM_BLOCKS, 2).layers[0].head_dim, r, 1).clone()
               for name, t in full.items()} for r in range(2)]
    dst = KVCacheView({name: torch.zeros_like(t) for name, t in full.items()}, NUM_BLOCKS, 2)
    for r, half in enumerate(halves):
        src = KVCacheView(half, NUM_BLOCKS, 1)
        assert src.signature() == dst.signature()  # the portable shape hides blocks and heads
        dst.scatter([6, 2], src.gather([1, 4]), HeadRange(r, 1))
    for layer in dst.layers:
        t = full[layer.name]
        for a, b in ((1, 6), (4, 2)):
            assert torch.equal(t.select(layer.block_dim, a), dst.tensors[layer.name].select(layer.block_dim, b))
    # And back: each TP2 rank gathers its head from the TP1 cache.
    src = KVCacheView(full, NUM_BLOCKS, 2)
    for r, half in enumerate(halves):
        rank = KVCacheView({name: torch.zeros_like(t) for name, t in half.items()}, NUM_BLOCKS, 1)
        rank.scatter([0], src.gather([3], HeadRange(r, 1)))
        for layer in rank.layers:
            got = rank.tensors[layer.name].select(layer.block_dim, 0)
            assert torch.equal(half[layer.name].select(layer.block_dim, 3), got)


def test_gather_into_caller_buffers():
    view = KVCacheView(cpu_layout(), NUM_BLOCKS, 2)
    out = [torch.empty(layer.slab_shape(2, HeadRange(1, 1)), dtype=layer.dtype) for layer in view.layers]
    slabs = view.gather([5, 0], HeadRange(1, 1), out=out)
    assert all(a is b for a, b in zip(slabs, out, strict=True))
    assert sum(o.numel() * 4 for o in out) == view.slab_bytes(2, HeadRange(1, 1)) == view.bytes_per_block


def test_block_runs_group_consecutive_ids():
    from cluster.kv.layout import block_runs

    assert block_runs([4, 5, 6, 1, 2, 9]) == [(0, 4, 3), (3, 1, 2), (5, 9, 1)]
    assert block_runs([]) == []


def test_scattered_blocks_take_the_indexed_path_with_the_same_bytes():
    from cluster.kv.layout import MAX_RUNS

    many = 2 * MAX_RUNS + 2
    src = KVCacheView({"l": torch.randn(many * 2, 2, 4, 8)}, many * 2, 2)
    dst = KVCacheView({"l": torch.zeros(many * 2, 2, 4, 8)}, many * 2, 2)
    src_blocks, dst_blocks = list(range(0, 2 * many, 2)), list(range(1, 2 * many, 2))  # no two adjacent
    dst.scatter(dst_blocks, src.gather(src_blocks))
    assert torch.equal(dst.tensors["l"][dst_blocks], src.tensors["l"][src_blocks])
    assert float(dst.tensors["l"][src_blocks].abs().sum()) == 0.0
