"""PrefillWorker: a vLLM engine as KV producer.

It runs prompts (chunked prefill), emits the first token, and keeps the request's KV blocks
allocated (vLLM's delayed free, via cluster/kv_connector.py) until the decode side has fetched
them and releases them, or the hold deadline passes.
"""

from __future__ import annotations

from cluster.worker import EngineWorker, KVWorkerMixin


class PrefillWorker(KVWorkerMixin, EngineWorker):
    role = "prefill"
