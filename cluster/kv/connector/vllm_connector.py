"""DisaggConnector: our vLLM KV connector (KVConnectorBase_V1), loaded by module path, split the
way vLLM splits every connector.

- Scheduler side (the worker actor's process, with vLLM's scheduler): delegates to the engine's
  KVScheduler (scheduler.py), found by the id in `kv_connector_extra_config`. vLLM's scheduler
  does the hard parts: a prefill request's blocks stay allocated after it finishes (delayed
  free), and a decode request waits in WAITING_FOR_REMOTE_KVS with its blocks allocated while
  its KV arrives, then computes only what was not transferred.
- Worker side (every rank process): a RankWorker (worker.py) over the rank's shard of the cache.

Per-request parameters ride in SamplingParams.extra_args["kv_transfer_params"]:
- producer: {"do_remote_decode": True, "transfer_id": str}
- consumer: {"do_remote_prefill": True, "transfer_id": str}  (source and token count are
  registered with the KVScheduler by the worker actor before the request is added)
- live migration, destination: {"migrated_in": migration_id}: the request's KV already sits in
  blocks reserved for it (cluster/kv/migration_ledger.py); it adopts them, nothing is loaded
- live migration, source: a request the worker marked as stopping keeps its not-yet-copied
  blocks (delayed free) until the destination pulled them
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.request import RequestStatus

from cluster.kv.connector.metadata import DisaggMetadata, PushTarget, RankEndpoint, RankReport
from cluster.kv.connector.scheduler import get_scheduler
from cluster.kv.connector.worker import RankWorker, rank_geometry


class DisaggConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._kv_cache_config_ref = kv_cache_config
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.kv = None
        self.rank = None
        if role == KVConnectorRole.SCHEDULER:
            self.kv = get_scheduler(extra["scheduler_id"])
            self.kv.bind(vllm_config.cache_config.block_size, tp_size)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank  # vLLM internals

            geometry = rank_geometry(vllm_config, kv_cache_config, get_tensor_model_parallel_rank(), tp_size)
            self.rank = RankWorker(extra, geometry)
        # Internal request ids whose remote KV was already asked for: a preempted request that
        # comes back recomputes locally instead of loading again.
        self._loads_requested: set[str] = set()

    # ---------------- scheduler side ----------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        migration_id = params.get("migrated_in")
        if migration_id:
            ready = min(self.kv.migrations.tokens_for(migration_id, request.request_id), request.num_tokens - 1)
            return max(0, ready - num_computed_tokens), False
        if params.get("push") is not None and params.get("do_remote_decode"):
            self.kv.register_push(request.request_id, params["transfer_id"], PushTarget.from_wire(params["push"]))
        if not params.get("do_remote_prefill") or request.request_id in self._loads_requested:
            return 0, False
        # The last prompt position is always computed here, so the next token can be sampled.
        remote = min(self.kv.expected_tokens(params["transfer_id"]), request.num_tokens - 1)
        if remote <= num_computed_tokens:
            return 0, False
        return remote - num_computed_tokens, True

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if params.get("migrated_in") and num_external_tokens > 0:
            self.kv.migrations.running(params["migrated_in"])
            return
        if num_external_tokens <= 0 or not params.get("do_remote_prefill"):
            return
        if request.request_id in self._loads_requested:
            return
        self._loads_requested.add(request.request_id)
        self.kv.start_load(params["transfer_id"], request.request_id, list(blocks.get_block_ids()[0]))

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.kv.take_metadata(scheduler_output)

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        self.kv.kv_cache_manager = kv_cache_manager  # block tables of requests that push layer-wise

    def update_connector_output(self, connector_output) -> None:
        report = connector_output.kv_connector_worker_meta
        self.kv.on_output(set(connector_output.finished_recving or ()), set(connector_output.failed_recving or ()),
                          report if isinstance(report, RankReport) else None)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._loads_requested.discard(request.request_id)
        mark = self.kv.migrations.take_stop_mark(request.request_id)
        if mark is not None:  # stopped for migration: keep what the destination still needs
            self.kv.hold_blocks(mark.transfer_id, request.request_id, list(block_ids[mark.from_block:]),
                                request.num_computed_tokens)
            return True, None
        params = request.kv_transfer_params or {}
        if params.get("migrated_in"):
            self.kv.migrations.finished(params["migrated_in"])
        if not params.get("do_remote_decode"):
            return False, None
        # Only a prefill that ran to its one-token limit hands off; an EOS or abort ends here.
        handed_off = request.status == RequestStatus.FINISHED_LENGTH_CAPPED
        if params.get("push") is not None:
            self.kv.push_finished(request.request_id, handed_off)
        if not handed_off:
            return False, None
        num_tokens = request.num_computed_tokens
        self.kv.hold(params["transfer_id"], request.request_id, list(block_ids), num_tokens)
        return True, {"kv_ready": True, "num_tokens": num_tokens}

    def has_pending_push_work(self) -> bool:
        return self.kv.has_pending_work()

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        self.kv.set_endpoints({rank: meta for rank, meta in metadata.items() if isinstance(meta, RankEndpoint)})

    # ---------------- worker side ----------------
    def register_kv_caches(self, kv_caches) -> None:
        self.rank.register_kv_caches(kv_caches, self._kv_cache_config_ref.num_blocks)

    def get_handshake_metadata(self) -> RankEndpoint | None:
        return self.rank.endpoint() if self.rank is not None else None

    def bind_connector_metadata(self, connector_metadata) -> None:
        """Before the step's forward pass: layer-wise pushes must know this step's blocks before
        its first layer is computed (vLLM may start loads only after the forward)."""
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, DisaggMetadata):
            self.rank.on_metadata(connector_metadata)  # loads run on the rank's threads

    def start_load_kv(self, forward_context, **kwargs) -> None:
        pass  # started in bind_connector_metadata

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        self.rank.push_sender.layer_computed(layer_name)  # layer-wise push: sent while the next computes

    def wait_for_save(self) -> None:
        self.rank.push_sender.flush_step()

    def get_finished(self, finished_req_ids: set[str]):
        sending, recving, _ = self.rank.take_results()
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving, failed = self.rank.take_results()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def build_connector_worker_meta(self) -> RankReport | None:
        return self.rank.report()

    def shutdown(self) -> None:
        if self.rank is not None:
            self.rank.shutdown()
