"""DisaggConnector: our vLLM KV connector (KVConnectorBase_V1), loaded by module path.

It lets vLLM's own scheduler do the hard parts — a prefill request's blocks stay allocated
after it finishes (delayed free), and a decode request waits in WAITING_FOR_REMOTE_KVS with
its blocks allocated while its KV arrives, then computes only what was not transferred. All
data movement is the KVTransferAgent's (cluster/kv/agent.py), found by the agent id in
`kv_connector_extra_config`.

Per-request parameters ride in SamplingParams.extra_args["kv_transfer_params"]:
- producer: {"do_remote_decode": True, "transfer_id": str}
- consumer: {"do_remote_prefill": True, "transfer_id": str}  (source and token count are
  registered with the agent by the worker before the request is added)
- live migration, destination: {"migrated_in": migration_id}: the request's KV already sits in
  blocks reserved for it (cluster/kv/migration_ledger.py); it adopts them, nothing is loaded
- live migration, source: a request the worker marked as stopping keeps its not-yet-copied
  blocks (delayed free) until the destination pulled them
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from cluster.kv.agent import get_agent

CONNECTOR_MODULE = "cluster.kv.connector"
CONNECTOR_CLASS = "DisaggConnector"


@dataclass
class DisaggConnectorMetadata(KVConnectorMetadata):
    """Nothing crosses from scheduler to worker side: the agent is shared in-process."""


class DisaggConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.agent = get_agent(extra["agent_id"])
        self._kv_cache_config_ref = kv_cache_config
        self._block_size = vllm_config.cache_config.block_size
        # Internal request ids whose remote KV was already asked for: a preempted request
        # that comes back recomputes locally instead of loading again.
        self._loads_requested: set[str] = set()

    # ---------------- scheduler side ----------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        migration_id = params.get("migrated_in")
        if migration_id:
            ready = min(self.agent.migrations.tokens_for(migration_id, request.request_id),
                        request.num_tokens - 1)
            return max(0, ready - num_computed_tokens), False
        if not params.get("do_remote_prefill") or request.request_id in self._loads_requested:
            return 0, False
        remote = self.agent.expected_tokens(params["transfer_id"])
        # The last prompt position is always computed here, so the next token can be sampled.
        remote = min(remote, request.num_tokens - 1)
        if remote <= num_computed_tokens:
            return 0, False
        return remote - num_computed_tokens, True

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if params.get("migrated_in") and num_external_tokens > 0:
            self.agent.migrations.running(params["migrated_in"])
            return
        if num_external_tokens <= 0 or not params.get("do_remote_prefill"):
            return
        if request.request_id in self._loads_requested:
            return
        self._loads_requested.add(request.request_id)
        block_ids = blocks.get_block_ids()[0]
        self.agent.start_load(params["transfer_id"], request.request_id, list(block_ids))

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return DisaggConnectorMetadata()

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._loads_requested.discard(request.request_id)
        mark = self.agent.migrations.take_stop_mark(request.request_id)
        if mark is not None:  # stopped for migration: keep what the destination still needs
            self.agent.hold_blocks(mark.transfer_id, request.request_id, list(block_ids[mark.from_block:]),
                                   request.num_computed_tokens)
            return True, None
        params = request.kv_transfer_params or {}
        if params.get("migrated_in"):
            self.agent.migrations.finished(params["migrated_in"])
        if not params.get("do_remote_decode"):
            return False, None
        from vllm.v1.request import RequestStatus

        # Only a prefill that ran to its one-token limit hands off; an EOS or abort ends here.
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED:
            return False, None
        num_tokens = request.num_computed_tokens
        self.agent.hold(params["transfer_id"], request.request_id, list(block_ids), num_tokens)
        return True, {"kv_ready": True, "num_tokens": num_tokens}

    def has_pending_push_work(self) -> bool:
        return self.agent.has_pending()

    # ---------------- worker side ----------------
    def register_kv_caches(self, kv_caches) -> None:
        num_blocks = self._kv_cache_config_ref.num_blocks
        self.agent.register_kv_caches(kv_caches, num_blocks, self._block_size)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        pass  # loads run on the agent's threads, outside the forward pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        pass  # the consumer pulls whole blocks once the prefill finished

    def wait_for_save(self) -> None:
        pass

    def get_finished(self, finished_req_ids: set[str]):
        sending, recving, _ = self._take()
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]):
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

        sending, recving, failed = self._take()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def _take(self):
        self.agent.expire_holds()
        return self.agent.take_finished()
