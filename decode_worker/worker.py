"""DecodeWorker: a vLLM engine as KV consumer.

A transferred request arrives as prompt + first token with `do_remote_prefill`; vLLM's
scheduler allocates its blocks and parks it while the agent pulls the prompt's KV from the
prefill worker, then computes only the first token's KV and decodes on with continuous
batching.
"""

from __future__ import annotations

from cluster.kv_transport import SourceRef
from cluster.protocol import EngineRequest
from cluster.worker import EngineWorker, KVWorkerMixin


class DecodeWorker(KVWorkerMixin, EngineWorker):
    role = "decode"

    def add_transferred(self, request: EngineRequest, source_id: str, source, num_tokens: int,
                        source_node: str | None = None) -> None:
        """Admit a request whose first `num_tokens` tokens' KV lives on `source` (an actor)."""
        transfer_id = request.kv_transfer["transfer_id"]
        self.agent.expect(transfer_id, SourceRef(source_id, source, source_node), num_tokens)
        try:
            self.loop.add(request)
        except Exception:
            self.agent.forget(transfer_id)
            raise

    def abort(self, request_ids: list[str]) -> None:
        self.loop.abort(request_ids)
        for request_id in request_ids:  # a load not started yet releases its source now
            self.agent.forget(request_id)
