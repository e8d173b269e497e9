"""PrefillWorker: a vLLM engine as KV producer.

It runs prompts (chunked prefill), emits the first token, and keeps the request's KV blocks
allocated (vLLM's delayed free, via cluster/kv/connector.py) until the decode side has fetched
them and releases them, or the hold deadline passes.
"""

from __future__ import annotations

from cluster.engine.worker import EngineWorker, KVWorkerMixin


class PrefillWorker(KVWorkerMixin, EngineWorker):
    """With speculation on, the draft model runs here only so that the prompt's draft KV exists
    and travels with the target's (same blocks, same layout as the decode side); a prefill
    verifies nothing, so no draft-selection policy is installed."""

    role = "prefill"
