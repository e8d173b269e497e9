"""Prefill pool: vLLM engine as KV producer (built on cluster.engine.worker.EngineWorker)."""
