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
