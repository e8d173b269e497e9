"""EngineWorker: the Ray actor around one EngineLoop, the base of every role's worker.

The roles' workers add to it: `decode_worker.colocated.ColocatedWorker` (both phases in one
plain vLLM engine, the baseline of every benchmark), `prefill_worker.worker.PrefillWorker` and
`decode_worker.worker.DecodeWorker` (with KVWorkerMixin's KV scheduler side). This module knows
none of them: the launcher maps a role to its class. It must never import a role's package.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import ray

from cluster.config import EngineConfig, SpecConfig, TransferConfig
from cluster.engine import vllm_adapter as va
from cluster.engine.loop import EngineLoop
from cluster.kv.connector.metadata import RankEndpoint
from cluster.kv.connector.scheduler import KVScheduler, register_scheduler
from cluster.protocol import EngineRequest, EngineSnapshot, InstanceInfo, LoadReport, StepBatch

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
        self.started_at = time.time()
        self.transfer = transfer or TransferConfig()
        self.spec = spec or SpecConfig()
        self.kv = self._make_kv()
        kv_config = None
        if self.kv is not None:
            kv_config = va.kv_transfer_config(self.role, self.kv.scheduler_id, instance_id, self.transfer,
                                              ray.util.get_node_ip_address())
        speculative = None
        if self.spec.enabled:
            speculative = va.speculative_config(self.spec.draft_model, self.spec.num_speculative_tokens)
        self.loop = EngineLoop(config, instance_id, kv_transfer=kv_config, kv=self.kv,
                               speculative=speculative)
        if speculative is not None:
            self.loop.spec_stats = self._install_spec_policy()

    def _make_kv(self) -> KVScheduler | None:
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
            tensor_parallel_size=self.config.tensor_parallel_size,
            rank_pids=tuple(va.rank_pids(engine)),
        )

    def describe(self) -> dict:
        """How this engine was built (a reattaching `up` compares it with its own config)."""
        return {"role": self.role, "instance_id": self.instance_id, "pid": os.getpid(),
                "started_at": self.started_at, "engine": dataclasses.asdict(self.config),
                "transfer": dataclasses.asdict(self.transfer), "spec": dataclasses.asdict(self.spec)}

    def add_request(self, request: EngineRequest) -> None:
        """Adds the request; an id this engine already ran is ignored (adds are idempotent)."""
        self.loop.add(request)

    def abort(self, request_ids: list[str]) -> None:
        self.loop.abort(request_ids)

    def fail_request(self, request_id: str, owner: str, reason: str) -> None:
        """Tells `owner` that `request_id` will not run here; its front end replays it."""
        self.loop.call(lambda loop: loop.fail(request_id, owner, reason), 10.0)

    def poll(self, timeout_s: float, owner: str = "") -> StepBatch:
        """The deltas of `owner`'s requests since its last poll (the front end's token pump)."""
        return self.loop.poll(timeout_s, owner)

    def load(self) -> LoadReport:
        return self.loop.load()

    def snapshot(self, prefix_since: int | None = None) -> EngineSnapshot:
        """Load, live requests and front-end leases: the global scheduler's view of this engine
        (and, with prefix caching on, the cached prefixes changed after `prefix_since`)."""
        return self.loop.snapshot(prefix_since)

    def run_local(self, requests: list[EngineRequest], timeout_s: float = 600.0) -> dict:
        return self.loop.run_local(requests, timeout_s)

    def shutdown(self) -> None:
        self.loop.stop()
        va.shutdown_engine(self.loop.engine)  # its rank processes (tensor parallelism) and connector


class KVWorkerMixin:
    """What every worker that moves KV adds: the scheduler side of the KV connector (created before
    the engine, found by vLLM's connector through its id) and the two calls peers make."""

    def _make_kv(self) -> KVScheduler:
        kv = KVScheduler(f"{self.instance_id}-{os.getpid()}", self.instance_id, timeout_s=self.transfer.timeout_s,
                         hold_timeout_s=self.transfer.hold_timeout_s)
        register_scheduler(kv)
        return kv

    def kv_release(self, transfer_id: str) -> bool:
        """A peer has (or will never fetch) the blocks held under `transfer_id`."""
        return self.kv.release(transfer_id)

    def kv_endpoints(self) -> list[RankEndpoint]:
        """Where this engine's ranks serve their KV (one entry per tensor-parallel rank)."""
        return list(self.kv.ranks)
