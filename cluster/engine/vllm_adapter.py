"""Every touch of vLLM internals for the engine wrapper, pinned to one vLLM version.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the step loop can read the
scheduler and block pool directly. tests/unit/cluster/engine/test_vllm_adapter.py breaks loudly if these
attributes move.
"""

from __future__ import annotations

import os

from cluster.config import EngineConfig, TransferConfig
from cluster.engine.vllm_cpu_fix import fix_cpu_expand_kernel, fix_top_k_without_drafts
from cluster.engine.vllm_pin import check_vllm_version
from cluster.kv.connector import CONNECTOR_CLASS, CONNECTOR_MODULE
from cluster.protocol import Sampling

GIB = 1 << 30


def kv_transfer_config(role: str, scheduler_id: str, instance_id: str, transfer: TransferConfig, host: str):
    """vLLM's KVTransferConfig that loads our connector for a prefill or decode engine. Only what
    is in `kv_connector_extra_config` reaches the rank processes (they re-import the connector)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector=CONNECTOR_CLASS,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role={"prefill": "kv_producer", "decode": "kv_both"}[role],
        kv_connector_extra_config={"scheduler_id": scheduler_id, "instance_id": instance_id, "host": host,
                                   "transport": transfer.transport},
        kv_load_failure_policy=transfer.failure_policy,
    )


def cpu_threads_bind(tensor_parallel_size: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for the ranks of one engine: the cores this process may use,
    split into one contiguous group per rank ("0|1"; "0-3|4-7"). With fewer cores than ranks,
    ranks share cores round-robin (vLLM CPU refuses to start ranks without an explicit binding
    unless each has its own NUMA node)."""
    cores = sorted(cores)
    if len(cores) < tensor_parallel_size:
        return "|".join(str(cores[r % len(cores)]) for r in range(tensor_parallel_size))
    per = len(cores) // tensor_parallel_size
    groups = [cores[r * per:(r + 1) * per] for r in range(tensor_parallel_size)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def speculative_config(draft_model: str, num_speculative_tokens: int, **extra) -> dict:
    """vLLM's ``speculative_config`` engine argument for draft-model speculative decoding; the
    draft's probabilities are kept ("probabilistic") because TETRIS ranks with them."""
    return {"method": "draft_model", "model": draft_model,
            "num_speculative_tokens": num_speculative_tokens,
            "draft_sample_method": "probabilistic", **extra}


def build_engine(config: EngineConfig, kv_transfer=None, speculative: dict | None = None):
    """An LLMEngine whose engine core lives in this process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    check_vllm_version()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.llm_engine import LLMEngine

    kwargs = config.engine_kwargs()
    if current_platform.is_cpu():
        # The CPU platform sizes its KV cache in bytes, not as a memory fraction (per rank).
        kwargs["kv_cache_memory_bytes"] = int(config.cpu_kv_cache_gib * GIB)
        if config.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind(config.tensor_parallel_size,
                                                                       list(os.sched_getaffinity(0)))
    if kv_transfer is not None:
        kwargs["kv_transfer_config"] = kv_transfer
    if config.enable_prefix_caching:
        # The prefix cache's block events feed the cluster's prefix index (install_kv_event_sink).
        from vllm.config import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    if speculative is not None:
        fix_cpu_expand_kernel()  # vLLM 0.32 CPU: sampled verification is garbage without it
        fix_top_k_without_drafts()  # vLLM 0.32: top-k in a step without drafts crashes
        kwargs["speculative_config"] = speculative
        # Draft lists reach the scheduler (where TETRIS trims them) only without async scheduling.
        kwargs["async_scheduling"] = False
    # The defaults vLLM's own OpenAI server takes on this platform (max_num_seqs,
    # max_num_batched_tokens): the engine context's are smaller on GPUs (128 and 2048).
    return LLMEngine.from_engine_args(EngineArgs(**kwargs), usage_context=server_usage_context())


def server_usage_context():
    """vLLM's usage context of its OpenAI server: it picks the server's engine defaults."""
    from vllm.usage.usage_lib import UsageContext

    return UsageContext.OPENAI_API_SERVER


class _EventSink:
    """Stands in for vLLM's KV event publisher (the scheduler publishes every step's
    BlockStored / BlockRemoved / AllBlocksCleared batch to it, on the engine's thread)."""

    def __init__(self, on_events):
        self.on_events = on_events

    def publish(self, batch) -> None:
        self.on_events(batch.events)

    def shutdown(self) -> None:
        return

    def get_publisher_config(self):
        return None


def install_kv_event_sink(engine, on_events) -> None:
    """Hands every KV cache event batch of the engine's prefix cache to `on_events(events)`
    (the engine must be built with prefix caching on: build_engine enables the events). vLLM
    0.32 offers ZMQ or nothing as publishers; the in-process scheduler's publisher attribute is
    the narrowest seam that keeps the events in this process."""
    sched = scheduler(engine)
    if not sched.enable_kv_cache_events:
        raise RuntimeError("KV cache events are off: build the engine with prefix caching on")
    sched.kv_event_publisher = _EventSink(on_events)


def prefix_caching_enabled(engine) -> bool:
    return bool(engine.vllm_config.cache_config.enable_prefix_caching)


def shutdown_engine(engine) -> None:
    """Stops the engine core and, with tensor parallelism, its rank processes."""
    engine.engine_core.shutdown()


def executor_failed(engine) -> bool:
    """A rank process died: vLLM's multiprocess executor marks itself failed."""
    return bool(getattr(engine_core(engine).model_executor, "is_failed", False))


def rank_pids(engine) -> list[int]:
    """The processes of the engine's ranks: vLLM's multiprocess executor's workers, or this
    process (one rank, in-process executor)."""
    workers = getattr(engine_core(engine).model_executor, "workers", None)
    if not workers:
        return [os.getpid()]
    return [w.proc.pid for w in workers]


def engine_core(engine):
    return engine.engine_core.engine_core


def scheduler(engine):
    return engine_core(engine).scheduler


def block_pool(engine):
    return scheduler(engine).kv_cache_manager.block_pool


def num_usable_blocks(engine) -> int:
    # Block 0 is vLLM's reserved null block; it is never free for requests.
    return block_pool(engine).num_gpu_blocks - 1


def num_free_blocks(engine) -> int:
    return block_pool(engine).get_num_free_blocks()


def num_running(engine) -> int:
    return len(scheduler(engine).running)


def queue_snapshot(engine) -> tuple[int, int, int, int]:
    """(running, waiting, prompt tokens not yet computed, blocks the head-of-line waiting
    request needs) from the scheduler's queues."""
    sched = scheduler(engine)
    queued = 0
    for request in list(sched.running) + list(sched.waiting):
        queued += max(0, request.num_prompt_tokens - request.num_computed_tokens)
    head_blocks = 0
    waiting = list(sched.waiting)
    if waiting:
        head_blocks = -(-waiting[0].num_tokens // block_size(engine))
    return len(sched.running), len(waiting), queued, head_blocks


def has_work(engine) -> bool:
    """Unfinished requests, or finished ones whose KV hand-off still needs engine steps."""
    return scheduler(engine).has_requests()


def block_size(engine) -> int:
    return engine.vllm_config.cache_config.block_size


def max_model_len(engine) -> int:
    return engine.model_config.max_model_len


def vocab_size(engine) -> int:
    return engine.model_config.get_vocab_size()


def to_sampling_params(sampling: Sampling, kv_transfer_params: dict | None = None):
    """vLLM SamplingParams that emit token ids only, as per-step deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        seed=sampling.seed,
        ignore_eos=sampling.ignore_eos,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None,
    )
