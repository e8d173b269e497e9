"""Every touch of vLLM internals for the engine wrapper, pinned to one vLLM version.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the step loop can read the
scheduler and block pool directly. tests/unit/cluster/engine/test_vllm_adapter.py breaks loudly if these
attributes move.
"""

from __future__ import annotations

import os

from cluster.config import EngineConfig
from cluster.engine.vllm_cpu_fix import fix_cpu_expand_kernel
from cluster.engine.vllm_pin import check_vllm_version
from cluster.protocol import Sampling

GIB = 1 << 30


def kv_transfer_config(role: str, agent_id: str, failure_policy: str):
    """vLLM's KVTransferConfig that loads our connector for a prefill or decode engine."""
    from vllm.config import KVTransferConfig

    from cluster.kv.connector import CONNECTOR_CLASS, CONNECTOR_MODULE  # imports vLLM itself

    return KVTransferConfig(
        kv_connector=CONNECTOR_CLASS,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role={"prefill": "kv_producer", "decode": "kv_both"}[role],
        kv_connector_extra_config={"agent_id": agent_id},
        kv_load_failure_policy=failure_policy,
    )


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
        # The CPU platform sizes its KV cache in bytes, not as a memory fraction.
        kwargs["kv_cache_memory_bytes"] = int(config.cpu_kv_cache_gib * GIB)
    if kv_transfer is not None:
        kwargs["kv_transfer_config"] = kv_transfer
    if speculative is not None:
        fix_cpu_expand_kernel()  # vLLM 0.32 CPU: sampled verification is garbage without it
        kwargs["speculative_config"] = speculative
        # Draft lists reach the scheduler (where TETRIS trims them) only without async scheduling.
        kwargs["async_scheduling"] = False
    return LLMEngine.from_engine_args(EngineArgs(**kwargs))


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
