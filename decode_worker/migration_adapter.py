"""vLLM internals live migration needs, in one place, pinned to vLLM 0.32.0.

Source side: read a running request's block table and progress. Destination side: take blocks
straight from the block pool as a reservation (no request owns them, so stages can write into
them while the engine keeps stepping), and at commit hand them to the new request as its first
blocks, so committing costs no copy however long the sequence is.

Every function runs on the engine's loop thread. tests/unit/decode_worker/test_migration_adapter.py breaks
loudly if the attributes used here move.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from cluster.engine import vllm_adapter as va


@dataclass(frozen=True)
class RequestProgress:
    """A request's state on the source at one instant."""

    status: str  # running | waiting | preempted | finished
    num_tokens: int  # prompt + output tokens
    num_computed_tokens: int  # tokens whose KV is in the cache
    num_preemptions: int
    block_ids: tuple[int, ...]  # the request's blocks (the only KV group), in order

    def full_blocks(self, block_size: int) -> int:
        """Blocks every slot of which holds computed KV: they never change again while the
        request keeps its blocks (a preemption frees them; num_preemptions tells)."""
        return min(len(self.block_ids), self.num_computed_tokens // block_size)


def _single_type_manager(engine):
    managers = va.scheduler(engine).kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1:
        raise RuntimeError(f"live migration supports one KV cache group, this model has {len(managers)}")
    return managers[0]


def migration_supported(engine) -> str | None:
    """None if this engine can take migrated requests, else why not."""
    if va.scheduler(engine).kv_cache_manager.enable_caching:
        return "prefix caching is on (adopting reserved blocks would bypass the block hashes)"
    try:
        _single_type_manager(engine)
    except RuntimeError as exc:
        return str(exc)
    return None


def request_progress(engine, internal_id: str) -> RequestProgress | None:
    from vllm.v1.request import RequestStatus

    request = va.scheduler(engine).requests.get(internal_id)
    if request is None:
        return None
    if request.is_finished():
        status = "finished"
    elif request.status == RequestStatus.RUNNING:
        status = "running"
    elif request.status == RequestStatus.PREEMPTED:
        status = "preempted"
    else:
        status = "waiting"
    blocks = va.scheduler(engine).kv_cache_manager.get_block_ids(internal_id)[0]
    return RequestProgress(status, request.num_tokens, request.num_computed_tokens,
                           request.num_preemptions, tuple(blocks))


def reserve_blocks(engine, num_blocks: int, keep_free: int) -> list | None:
    """`num_blocks` blocks from the pool, or None if that would leave fewer than `keep_free`."""
    pool = va.block_pool(engine)
    if num_blocks <= 0:
        return []
    if pool.get_num_free_blocks() - num_blocks < keep_free:
        return None
    return pool.get_new_blocks(num_blocks)


def free_blocks(engine, blocks: list) -> None:
    if blocks:
        va.block_pool(engine).free_blocks(reversed(blocks))


def adopt_blocks(engine, internal_id: str, blocks: list) -> None:
    """Makes `blocks` the first blocks of a waiting request that has none yet. vLLM then
    treats it like a request already holding them (the coordinator's running-request path):
    it allocates only the blocks beyond them and frees them with the request."""
    manager = _single_type_manager(engine)
    if manager.req_to_blocks.get(internal_id):
        raise RuntimeError(f"request {internal_id} already holds blocks")
    manager.req_to_blocks[internal_id] = list(blocks)
    manager.num_cached_block[internal_id] = len(blocks)


def check_migration_internals() -> None:
    """Fails loudly if the vLLM attributes used above moved."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
    from vllm.v1.request import Request

    va.check_vllm_version()
    for cls, names in ((BlockPool, ("get_new_blocks", "free_blocks", "get_num_free_blocks")),
                       (SingleTypeKVCacheManager, ("get_num_blocks_to_allocate", "allocate_new_blocks", "free")),
                       (KVCacheCoordinator, ("allocate_new_computed_blocks",)),
                       (Request, ("is_finished",))):
        for name in names:
            if not hasattr(cls, name):
                raise RuntimeError(f"vLLM moved {cls.__name__}.{name}")
    # The adoption relies on these two lines of behaviour; re-read them when vLLM changes.
    src = inspect.getsource(KVCacheCoordinator.allocate_new_computed_blocks)
    if "request_id in manager.num_cached_block" not in src:
        raise RuntimeError("vLLM changed how running requests skip computed-block allocation")
    src = inspect.getsource(SingleTypeKVCacheManager.get_num_blocks_to_allocate)
    if "if request_id in self.num_cached_block" not in src:
        raise RuntimeError("vLLM changed the running-request fast path of get_num_blocks_to_allocate")
