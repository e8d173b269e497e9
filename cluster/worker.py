"""EngineWorker: the Ray actor around one EngineLoop.

A colocated worker (both phases, plain vLLM) is this actor with role "colocated"; it is the
baseline of every benchmark and a serving mode of its own. The prefill and decode workers
(prefill_worker/, decode_worker/) extend it with a KV transfer agent.
"""

from __future__ import annotations

import logging
import os

from cluster import vllm_adapter as va
from cluster.config import EngineConfig, PoolConfig, SpecConfig, TransferConfig
from cluster.engine import EngineLoop
from cluster.protocol import EngineRequest, InstanceInfo, LoadReport, StepBatch

log = logging.getLogger(__name__)

# poll() blocks a thread while it waits for output; the rest of the calls must not queue behind it.
ACTOR_CONCURRENCY = 16


class EngineWorker:
    role = "colocated"

    def __init__(self, config: EngineConfig, instance_id: str, transfer: TransferConfig | None = None,
                 spec: SpecConfig | None = None):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM logs every engine's start-up at INFO; operators raise it with VLLM_LOGGING_LEVEL.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        logging.basicConfig(level=logging.INFO)
        self.config = config
        self.instance_id = instance_id
        self.transfer = transfer or TransferConfig()
        self.spec = spec or SpecConfig()
        self.agent = self._make_agent()
        kv_config = None
        if self.agent is not None:
            kv_config = va.kv_transfer_config(self.role, self.agent.agent_id, self.transfer.failure_policy)
        speculative = self._speculative_config()
        self.loop = EngineLoop(config, instance_id, kv_transfer=kv_config, agent=self.agent,
                               speculative=speculative)
        if speculative is not None:
            self.loop.spec_stats = self._install_spec_policy()

    def _make_agent(self):
        return None  # colocated engines move no KV

    def _tetris_config(self):
        from decode_worker.tetris import TetrisConfig

        s = self.spec
        return TetrisConfig(k=s.k, extra=s.extra, capacity=s.capacity, min_batch_size=s.min_batch_size,
                            enabled=s.tetris)

    def _speculative_config(self) -> dict | None:
        if not self.spec.enabled:
            return None
        from decode_worker.spec_adapter import speculative_config

        return speculative_config(self.spec.draft_model, self._tetris_config())

    def _install_spec_policy(self):
        """TETRIS (or, with --no-tetris, plain window k over the same k+e proposals)."""
        from decode_worker.spec_adapter import install_tetris

        return install_tetris(self.loop.engine, self._tetris_config())

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
            pid=os.getpid(),
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
        if self.agent is not None:
            self.agent.shutdown()


def _make_kv_agent(instance_id: str, transfer: TransferConfig):
    from cluster.kv_agent import KVTransferAgent, register_agent
    from cluster.kv_transport import make_transport

    import ray

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    agent = KVTransferAgent(instance_id, make_transport(transfer.transport, instance_id, node_id),
                            timeout_s=transfer.timeout_s,
                            hold_timeout_s=transfer.hold_timeout_s)
    register_agent(agent)
    return agent


class KVWorkerMixin:
    """What every worker that moves KV exposes: export and release of held blocks."""

    def _make_agent(self):
        return _make_kv_agent(self.instance_id, self.transfer)

    def kv_export(self, transfer_id: str) -> dict | None:
        return self.agent.export(transfer_id)

    def kv_release(self, transfer_id: str) -> bool:
        return self.agent.release(transfer_id)

    def kv_export_shm(self, transfer_id: str) -> dict | None:
        return self.agent.export_shm(transfer_id)

    def kv_nccl_join(self, key: str, unique_id, signature) -> bool:
        return self.agent.nccl_join(key, unique_id, signature)

    def kv_nccl_send(self, key: str, transfer_id: str) -> bool:
        return self.agent.nccl_send(key, transfer_id)


def worker_class(role: str):
    if role == "prefill":
        from prefill_worker.worker import PrefillWorker

        return PrefillWorker
    if role == "decode":
        from decode_worker.worker import DecodeWorker

        return DecodeWorker
    return EngineWorker


def spawn_worker(config: EngineConfig, pool: PoolConfig, instance_id: str, transfer: TransferConfig,
                 spec: SpecConfig | None = None):
    """Start one worker actor of `pool` (returns its handle at once; call info() to wait)."""
    import ray

    resources = {pool.resource: 1} if pool.resource else None
    actor_cls = ray.remote(worker_class(pool.role))
    return actor_cls.options(
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        resources=resources,
        max_concurrency=ACTOR_CONCURRENCY,
    ).remote(config, instance_id, transfer, spec)
