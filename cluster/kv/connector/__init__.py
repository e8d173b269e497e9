"""Our vLLM KV connector, in vLLM's own split (see vllm_connector.py):

| module | side | role |
| --- | --- | --- |
| `vllm_connector.py` | both | `DisaggConnector`, the class vLLM loads by module path |
| `scheduler.py` | scheduler (worker actor process) | `KVScheduler`: holds, loads, pulls, migration ledger, counters |
| `worker.py` | every rank process | `RankWorker`: the rank's KV shard, side-channel server, loads |
| `metadata.py` | both | what crosses between them: `DisaggMetadata`, `RankReport`, `RankEndpoint` |
"""

CONNECTOR_MODULE = "cluster.kv.connector.vllm_connector"
CONNECTOR_CLASS = "DisaggConnector"
