"""Breaks loudly when vLLM moves the internals cluster/engine/vllm_adapter.py reads.

Building an engine is left to the integration tests; here we check, without one, that the
installed vLLM is the pinned version and still has the attributes and signatures we use.
"""

import inspect

import vllm

from cluster.config import SpecConfig
from cluster.engine import vllm_adapter as va
from cluster.engine.vllm_pin import PINNED_VLLM_VERSION


def test_pinned_version():
    assert vllm.__version__ == PINNED_VLLM_VERSION, (
        f"vLLM {vllm.__version__} installed; the adapters are written for {PINNED_VLLM_VERSION}")


def test_engine_core_reachable_in_process():
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.engine.llm_engine import LLMEngine

    assert "engine_core" in inspect.getsource(InprocClient.__init__)
    for name in ("add_request", "abort_request", "step", "has_unfinished_requests"):
        assert hasattr(LLMEngine, name), name
    assert "priority" in inspect.signature(LLMEngine.add_request).parameters


def test_scheduler_and_block_pool_attributes():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    sched_init = inspect.getsource(Scheduler.__init__)
    for attr in ("self.running", "self.waiting", "self.kv_cache_manager", "self.requests"):
        assert attr in sched_init, attr
    assert "self.block_pool" in inspect.getsource(KVCacheManager.__init__)
    assert hasattr(BlockPool, "get_num_free_blocks")
    assert "self.num_gpu_blocks" in inspect.getsource(BlockPool.__init__)
    for prop in ("num_prompt_tokens", "num_computed_tokens"):
        assert prop in inspect.getsource(Request), prop


def test_sampling_params_delta_token_ids():
    from vllm.sampling_params import RequestOutputKind

    from cluster.protocol import Sampling

    params = va.to_sampling_params(Sampling(max_tokens=5, temperature=0.0, stop_token_ids=(3,), seed=1))
    assert params.output_kind == RequestOutputKind.DELTA
    assert params.detokenize is False
    assert params.max_tokens == 5 and params.stop_token_ids == [3] and params.seed == 1


def test_draft_model_speculative_config_shape():
    spec = SpecConfig(draft_model="/models/draft", k=3, extra=2)
    cfg = va.speculative_config(spec.draft_model, spec.num_speculative_tokens)
    assert cfg == {"method": "draft_model", "model": "/models/draft",
                   "num_speculative_tokens": 5, "draft_sample_method": "probabilistic"}
    # vLLM still accepts these keys.
    from vllm.config import SpeculativeConfig

    fields = set(SpeculativeConfig.__dataclass_fields__)
    assert {"method", "model", "num_speculative_tokens", "draft_sample_method"} <= fields


def test_tensor_parallel_internals_the_adapter_reads():
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor, WorkerProcHandle

    init = inspect.getsource(MultiprocExecutor._init_executor)
    assert "self.is_failed = False" in init and "self.workers = " in init
    assert "proc" in WorkerProcHandle.__dataclass_fields__
    assert callable(InprocClient.shutdown)


def test_cpu_threads_bind_gives_every_rank_its_own_cores():
    assert va.cpu_threads_bind(2, [0, 1]) == "0|1"
    assert va.cpu_threads_bind(2, [3, 0, 1, 2]) == "0,1|2,3"
    assert va.cpu_threads_bind(2, [5]) == "5|5"  # fewer cores than ranks: they share
    assert va.cpu_threads_bind(3, [0, 1, 2, 3]) == "0|1|2"


def test_engines_take_the_defaults_of_vllms_own_server():
    # Breaks loudly if vLLM moves its per-context defaults: ours must be its server's (on CPUs
    # 128 sequences and 2048 tokens a step), not the engine context's fallbacks.
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.llm_engine import LLMEngine

    assert "usage_context" in inspect.signature(LLMEngine.from_engine_args).parameters
    tokens, seqs = EngineArgs.get_batch_defaults(1)
    context = va.server_usage_context()
    assert context in tokens and context in seqs
    if current_platform.is_cpu():
        assert (tokens[context], seqs[context]) == (2048, 128)


def test_tensor_parallel_engine_arguments():
    from cluster.config import EngineConfig

    assert "tensor_parallel_size" not in EngineConfig(model="m").engine_kwargs()
    kwargs = EngineConfig(model="m", tensor_parallel_size=2).engine_kwargs()
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["distributed_executor_backend"] == "mp"


def test_kv_cache_event_seam_the_prefix_tracker_reads():
    """install_kv_event_sink replaces the scheduler's publisher; the tracker reads these fields."""
    import dataclasses as _dc

    from vllm.config import KVEventsConfig
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
    from vllm.v1.core.sched.scheduler import Scheduler

    assert "self.kv_event_publisher" in inspect.getsource(Scheduler.__init__)
    assert "self.enable_kv_cache_events" in inspect.getsource(Scheduler.__init__)
    assert "self.kv_event_publisher.publish(batch)" in inspect.getsource(Scheduler.update_from_output)
    assert "events" in {f.name for f in _dc.fields(KVEventBatch)} if _dc.is_dataclass(KVEventBatch) \
        else "events" in KVEventBatch.__annotations__
    stored = set(BlockStored.__annotations__)
    assert {"block_hashes", "parent_block_hash", "token_ids", "block_size", "group_idx"} <= stored
    assert "block_hashes" in BlockRemoved.__annotations__
    assert AllBlocksCleared.__name__ == "AllBlocksCleared"
    cfg = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    assert cfg.enable_kv_cache_events and cfg.publisher == "null"
    from vllm.config import CacheConfig

    assert "enable_prefix_caching" in {f.name for f in _dc.fields(CacheConfig)}  # prefix_caching_enabled
