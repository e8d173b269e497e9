"""The cluster's prefix block names: chained, stable, full blocks only."""

import pytest

from cluster.kv.prefix_hash import ROOT, block_hashes, chain_hash


def test_names_chain_over_full_blocks_only():
    tokens = list(range(100, 150))
    names = block_hashes(tokens, 16)
    assert len(names) == 3  # 50 tokens: three full blocks, the partial fourth has no name
    assert names[0] == chain_hash(ROOT, tokens[:16])
    assert names[2] == chain_hash(names[1], tokens[32:48])
    assert block_hashes(tokens, 16, limit=2) == names[:2]


def test_a_name_stands_for_the_whole_prefix():
    a = [1] * 16 + [2] * 16
    b = [3] * 16 + [2] * 16  # same second block, different first block
    assert block_hashes(a, 16)[1] != block_hashes(b, 16)[1]
    assert block_hashes(a + [9] * 40, 16)[:2] == block_hashes(a, 16)


def test_stable_values_and_range():
    # Fixed across processes and machines (front ends and engines must agree on them).
    assert chain_hash(ROOT, [1, 2, 3]) == chain_hash(0, (1, 2, 3))
    assert 0 <= chain_hash(ROOT, [5] * 128) < 2 ** 63
    assert chain_hash(ROOT, [1, 2]) != chain_hash(ROOT, [2, 1])


def test_bad_block_size():
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)
