"""EngineWorker: the Ray actor around one EngineLoop, the base of every role's worker.

The roles' workers add to it: `decode_worker.colocated.ColocatedWorker` (both phases in one
plain vLLM engine, the baseline of every benchmark), `prefill_worker.worker.PrefillWorker` and
`decode_worker.worker.DecodeWorker` (with KVWorkerMixin's transfer agent). This module knows
none of them: the launcher maps a role to its class. It must never import a role's package.
"""

from __future__ import annotations

import logging
import os

import ray

from cluster.config import EngineConfig, SpecConfig, TransferConfig
from cluster.engine import vllm_adapter as va
from cluster.engine.loop import EngineLoop
from cluster.kv.agent import KVTransferAgent, register_agent
from cluster.kv.transports import make_transport
from cluster.protocol import EngineRequest, InstanceInfo, LoadReport, StepBatch

log = logging.getLogger(__name__)

# poll() blocks a thread while it waits for output; the rest of the calls must not queue behind it.
ACTOR_CONCURRENCY = 16


class EngineWorker:
    role = ""  # set by each role's subclass

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
        speculative = None
        if self.spec.enabled:
            speculative = va.speculative_config(self.spec.draft_model, self.spec.num_speculative_tokens)
        self.loop = EngineLoop(config, instance_id, kv_transfer=kv_config, agent=self.agent,
                               speculative=speculative)
        if speculative is not None:
            self.loop.spec_stats = self._install_spec_policy()

    def _make_agent(self) -> KVTransferAgent | None:
        return None  # an engine that moves no KV

    def _install_spec_policy(self):
        """The draft-selection policy of a speculating engine and its stats object (None: vLLM's
        own window of k + e drafts). Decode-side workers install TETRIS here."""
        return None

    def info(self) -> InstanceInfo:
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



def make_kv_agent(instance_id: str, transfer: TransferConfig) -> KVTransferAgent:
    """The transfer agent of a worker that moves KV, registered where vLLM's connector finds it."""
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    agent = KVTransferAgent(instance_id, make_transport(transfer.transport, instance_id, node_id),
                            timeout_s=transfer.timeout_s,
                            hold_timeout_s=transfer.hold_timeout_s)
    register_agent(agent)
    return agent


class KVWorkerMixin:
    """What every worker that moves KV exposes: export and release of held blocks."""

    def _make_agent(self):
        return make_kv_agent(self.instance_id, self.transfer)

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
