import itertools

import pytest

from cluster.kv.heads import HeadLayoutError, HeadSlice, check_tp, heads_of_rank, plan_rank


def test_sharding_matches_vllm_rules():
    assert [list(heads_of_rank(r, 2, 8)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [list(heads_of_rank(r, 4, 2)) for r in range(4)] == [[0], [0], [1], [1]]  # replicated
    assert list(heads_of_rank(0, 1, 2)) == [0, 1]


@pytest.mark.parametrize("heads, tp", [(3, 2), (2, 3), (4, 6)])
def test_unshardable_degrees_are_refused(heads, tp):
    with pytest.raises(HeadLayoutError):
        check_tp(heads, tp)


def test_equal_tp_pairs_rank_i_with_rank_i_whole_blocks():
    for r in range(2):
        assert plan_rank(r, 2, 2, 2) == (HeadSlice(r, 0, 0, 1),)
    assert plan_rank(0, 1, 1, 2) == (HeadSlice(0, 0, 0, 2),)


def test_tp2_to_tp1_takes_half_a_block_from_each_rank():
    assert plan_rank(0, 1, 2, 2) == (HeadSlice(0, 0, 0, 1), HeadSlice(1, 0, 1, 1))
    assert plan_rank(0, 1, 2, 8) == (HeadSlice(0, 0, 0, 4), HeadSlice(1, 0, 4, 4))


def test_tp1_to_tp2_takes_each_ranks_slice_of_the_one_source():
    assert plan_rank(0, 2, 1, 2) == (HeadSlice(0, 0, 0, 1),)
    assert plan_rank(1, 2, 1, 2) == (HeadSlice(0, 1, 0, 1),)


def test_replicated_heads_come_from_the_aligned_rank():
    # 2 heads over TP4 (each head twice) -> TP2 (one head each): rank 1 reads head 1 from rank 2.
    assert plan_rank(1, 2, 4, 2) == (HeadSlice(2, 0, 0, 1),)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_every_plan_covers_exactly_the_destination_heads(heads):
    degrees = [t for t in (1, 2, 4, 8, 16) if (t <= heads and heads % t == 0) or (t > heads and t % heads == 0)]
    for src_tp, dst_tp in itertools.product(degrees, repeat=2):
        for d in range(dst_tp):
            covered = []
            for s in plan_rank(d, dst_tp, src_tp, heads):
                src_heads = heads_of_rank(s.src_rank, src_tp, heads)
                covered += [src_heads[s.src_start + i] for i in range(s.count)]
                assert [s.dst_start + i for i in range(s.count)] == list(range(s.dst_start, s.dst_start + s.count))
            assert covered == list(heads_of_rank(d, dst_tp, heads)), (src_tp, dst_tp, d)
