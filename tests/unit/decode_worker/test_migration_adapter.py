"""decode_worker/migration_adapter.py against the installed vLLM, without an engine: the pinned
internals are still there, and the block adoption works on a real BlockPool + KVCacheManager
(built directly, as the scheduler builds it, with prefix caching off like our decode engines).

The property the migration's zero-copy commit rests on: a request that adopted reserved blocks
R before vLLM scheduled it gets R as its first blocks, vLLM allocates only the blocks beyond
them, and freeing the request returns every block (R included) to the pool exactly once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request, RequestStatus

from decode_worker import migration_adapter as ma

BLOCK = 4
NUM_BLOCKS = 20  # block 0 is vLLM's null block: 19 usable


def test_migration_internals_still_there():
    ma.check_migration_internals()


@pytest.mark.parametrize("computed,blocks,expected", [
    (0, 0, 0), (3, 1, 0), (4, 1, 1), (9, 3, 2), (12, 3, 3), (13, 4, 3),
    (20, 3, 3),  # never more than the request holds
])
def test_full_blocks(computed, blocks, expected):
    p = ma.RequestProgress("running", computed + 1, computed, 0, tuple(range(blocks)))
    assert p.full_blocks(BLOCK) == expected


# ---------------------------------------------------------------- a real block manager

def make_manager(enable_caching: bool = False) -> KVCacheManager:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return KVCacheManager(config, max_model_len=256, scheduler_block_size=BLOCK, hash_block_size=BLOCK,
                          enable_caching=enable_caching)


def engine_for(manager: KVCacheManager, requests: dict | None = None):
    """What cluster/engine/vllm_adapter.py reaches through: engine.engine_core.engine_core.scheduler."""
    scheduler = SimpleNamespace(kv_cache_manager=manager, requests=requests if requests is not None else {})
    return SimpleNamespace(engine_core=SimpleNamespace(engine_core=SimpleNamespace(scheduler=scheduler)))


def make_request(request_id: str, num_tokens: int) -> Request:
    return Request(request_id, list(range(1, num_tokens + 1)), SamplingParams(max_tokens=64), None)


@pytest.fixture
def manager():
    return make_manager()


@pytest.fixture
def engine(manager):
    return engine_for(manager)


def block_ids(manager, request_id):
    return manager.get_block_ids(request_id)[0]


def test_decode_engines_support_migration(engine):
    assert ma.migration_supported(engine) is None


def test_prefix_caching_engines_refuse_migration():
    assert "prefix caching" in ma.migration_supported(engine_for(make_manager(enable_caching=True)))


def test_more_than_one_kv_group_is_refused():
    fake = SimpleNamespace(enable_caching=False,
                           coordinator=SimpleNamespace(single_type_managers=(object(), object())))
    assert "one KV cache group" in ma.migration_supported(engine_for(fake))


def test_reserve_blocks_keeps_the_watermark(manager, engine):
    pool = manager.block_pool
    start = pool.get_num_free_blocks()
    assert start == NUM_BLOCKS - 1
    assert ma.reserve_blocks(engine, 0, 1) == []
    r = ma.reserve_blocks(engine, 5, 1)
    assert len(r) == 5 and len({b.block_id for b in r}) == 5 and all(b.ref_cnt == 1 for b in r)
    assert pool.get_num_free_blocks() == start - 5
    assert ma.reserve_blocks(engine, start - 5, 1) is None  # would leave 0 < 1 free
    assert pool.get_num_free_blocks() == start - 5  # nothing taken
    rest = ma.reserve_blocks(engine, start - 6, 1)
    assert len(rest) == start - 6 and pool.get_num_free_blocks() == 1
    ma.free_blocks(engine, r)
    ma.free_blocks(engine, rest)
    ma.free_blocks(engine, [])
    assert pool.get_num_free_blocks() == start
    assert all(b.ref_cnt == 0 for b in r + rest)


def test_adopted_blocks_become_the_requests_first_blocks(manager, engine):
    pool = manager.block_pool
    start = pool.get_num_free_blocks()
    reserved = ma.reserve_blocks(engine, 3, 1)  # the KV of 12 tokens arrived in these
    reserved_ids = [b.block_id for b in reserved]
    req = make_request("mig@2-internal", 13)  # prompt + every token so far; 12 have KV
    ma.adopt_blocks(engine, req.request_id, reserved)
    assert block_ids(manager, req.request_id) == reserved_ids

    # The scheduler's first allocation for it (the connector reports 12 tokens ready, nothing
    # to load): 12 external tokens + 1 to compute = 13 slots = 4 blocks, 3 of them adopted.
    new = manager.allocate_slots(req, 1, new_computed_blocks=manager.empty_kv_cache_blocks,
                                 num_external_computed_tokens=12, full_sequence_must_fit=True)
    assert new is not None
    (new_ids,) = new.get_block_ids()
    assert len(new_ids) == 1 and new_ids[0] not in reserved_ids
    assert block_ids(manager, req.request_id) == reserved_ids + new_ids
    assert pool.get_num_free_blocks() == start - 4

    # Decoding on: vLLM grows the same table, one block per BLOCK tokens.
    req.status = RequestStatus.RUNNING
    req.num_computed_tokens = 13
    for _ in range(3):  # 14, 15, 16 tokens: still 4 blocks
        req.append_output_token_ids(7)
        assert manager.allocate_slots(req, 1).get_block_ids()[0] == []
        req.num_computed_tokens += 1
    req.append_output_token_ids(7)  # 17 tokens: a fifth block
    (grown,) = manager.allocate_slots(req, 1).get_block_ids()
    assert len(grown) == 1
    assert block_ids(manager, req.request_id) == reserved_ids + new_ids + grown
    assert pool.get_num_free_blocks() == start - 5

    # Finishing frees every block, the adopted ones included, exactly once.
    manager.free(req)
    assert pool.get_num_free_blocks() == start
    assert all(b.ref_cnt == 0 for b in reserved)
    assert block_ids(manager, req.request_id) == []


def test_adopted_request_that_needs_no_new_block(manager, engine):
    """The tail ends mid-block: the token to compute fits in the last adopted block."""
    pool = manager.block_pool
    start = pool.get_num_free_blocks()
    reserved = ma.reserve_blocks(engine, 3, 1)  # 10 tokens of KV: 3 blocks, the last one half full
    req = make_request("r-internal", 11)
    ma.adopt_blocks(engine, req.request_id, reserved)
    new = manager.allocate_slots(req, 1, new_computed_blocks=manager.empty_kv_cache_blocks,
                                 num_external_computed_tokens=10)
    assert new.get_block_ids()[0] == []
    assert block_ids(manager, req.request_id) == [b.block_id for b in reserved]
    assert pool.get_num_free_blocks() == start - 3
    manager.free(req)
    assert pool.get_num_free_blocks() == start


def test_adopted_request_that_does_not_fit_keeps_its_blocks_until_freed(manager, engine):
    """allocate_slots refusing (no room for the rest) leaves the adoption as it was; the
    request waits, and an abort then frees the adopted blocks with it."""
    pool = manager.block_pool
    start = pool.get_num_free_blocks()
    reserved = ma.reserve_blocks(engine, 3, 0)
    hog = ma.reserve_blocks(engine, pool.get_num_free_blocks(), 0)  # the pool is now empty
    req = make_request("r-internal", 13)
    ma.adopt_blocks(engine, req.request_id, reserved)
    assert manager.allocate_slots(req, 1, new_computed_blocks=manager.empty_kv_cache_blocks,
                                  num_external_computed_tokens=12) is None
    assert block_ids(manager, req.request_id) == [b.block_id for b in reserved]
    manager.free(req)  # aborted while waiting
    ma.free_blocks(engine, hog)
    assert pool.get_num_free_blocks() == start


def test_adopt_refuses_a_request_that_holds_blocks(manager, engine):
    req = make_request("r-internal", 5)
    manager.allocate_slots(req, 5)
    other = ma.reserve_blocks(engine, 2, 1)
    with pytest.raises(RuntimeError, match="already holds blocks"):
        ma.adopt_blocks(engine, req.request_id, other)
    ma.free_blocks(engine, other)
    manager.free(req)
    assert manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1


def test_request_progress_reads_status_and_block_table(manager):
    req = make_request("r-internal", 9)
    engine = engine_for(manager, {req.request_id: req})
    assert ma.request_progress(engine, "missing") is None
    p = ma.request_progress(engine, req.request_id)
    assert (p.status, p.num_tokens, p.num_computed_tokens, p.num_preemptions, p.block_ids) == (
        "waiting", 9, 0, 0, ())
    manager.allocate_slots(req, 9)
    req.status, req.num_computed_tokens = RequestStatus.RUNNING, 9
    p = ma.request_progress(engine, req.request_id)
    assert p.status == "running" and p.num_computed_tokens == 9
    assert p.block_ids == tuple(block_ids(manager, req.request_id)) and len(p.block_ids) == 3
    assert p.full_blocks(BLOCK) == 2
    req.status = RequestStatus.PREEMPTED
    assert ma.request_progress(engine, req.request_id).status == "preempted"
    req.status = RequestStatus.FINISHED_ABORTED
    assert ma.request_progress(engine, req.request_id).status == "finished"
    manager.free(req)
