"""PrefillWorker: a vLLM engine as KV producer.

It runs prompts (chunked prefill), emits the first token, and keeps the request's KV blocks
allocated (vLLM's delayed free, via cluster/kv_connector.py) until the decode side has fetched
them and releases them, or the hold deadline passes.
"""

from __future__ import annotations

from cluster.worker import EngineWorker, KVWorkerMixin


class PrefillWorker(KVWorkerMixin, EngineWorker):
    role = "prefill"

    def _install_spec_policy(self):
        # The draft model runs here only so the prompt's draft KV exists and travels with the
        # target's (same blocks, same layout as the decode side); a prefill verifies nothing.
        return None
