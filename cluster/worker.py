"""EngineWorker: the Ray actor around one EngineLoop.

A colocated worker (both phases, plain vLLM) is this actor with role "colocated"; it is the
baseline of every benchmark and a serving mode of its own. Prefill and decode workers build
on the same actor.
"""

from __future__ import annotations

import logging
import os

from cluster import vllm_adapter as va
from cluster.config import EngineConfig, PoolConfig
from cluster.engine import EngineLoop
from cluster.protocol import EngineRequest, InstanceInfo, LoadReport, StepBatch

log = logging.getLogger(__name__)

# poll() blocks a thread while it waits for output; the rest of the calls must not queue behind it.
ACTOR_CONCURRENCY = 8


class EngineWorker:
    def __init__(self, config: EngineConfig, instance_id: str, role: str = "colocated"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        logging.basicConfig(level=logging.INFO)
        self.config = config
        self.instance_id = instance_id
        self.role = role
        self.loop = EngineLoop(config, instance_id)

    def info(self) -> InstanceInfo:
        import ray

        engine = self.loop.engine
        tokenizer_eos = engine.model_config.hf_config.eos_token_id
        eos = tokenizer_eos if isinstance(tokenizer_eos, list) else [tokenizer_eos]
        return InstanceInfo(
            instance_id=self.instance_id,
            role=self.role,
            node_id=ray.get_runtime_context().get_node_id(),
            model=self.config.model,
            max_model_len=va.max_model_len(engine),
            block_size=va.block_size(engine),
            num_total_blocks=va.num_usable_blocks(engine),
            vocab_size=va.vocab_size(engine),
            eos_token_ids=tuple(e for e in eos if e is not None),
            bos_token_id=engine.model_config.hf_config.bos_token_id,
        )

    def add_request(self, request: EngineRequest) -> None:
        self.loop.add(request)

    def abort(self, request_ids: list[str]) -> None:
        self.loop.abort(request_ids)

    def poll(self, timeout_s: float) -> StepBatch:
        return self.loop.poll(timeout_s)

    def load(self) -> LoadReport:
        return self.loop.load()

    def run_local(self, requests: list[EngineRequest], timeout_s: float = 600.0) -> dict:
        return self.loop.run_local(requests, timeout_s)

    def shutdown(self) -> None:
        self.loop.stop()


def spawn_worker(config: EngineConfig, pool: PoolConfig, instance_id: str):
    """Start one worker actor of `pool` (returns its handle at once; call info() to wait)."""
    import ray

    resources = {pool.resource: 1} if pool.resource else None
    actor_cls = ray.remote(EngineWorker)
    return actor_cls.options(
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        resources=resources,
        max_concurrency=ACTOR_CONCURRENCY,
    ).remote(config, instance_id, pool.role)
