"""Prometheus metrics of the router: request latencies, outcomes, per-instance load."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                  0.5, 0.75, 1.0, 2.0, 5.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("disagg_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("disagg_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.itl = Histogram("disagg_inter_token_latency_seconds",
                             "Time between consecutive streamed token batches, per token",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("disagg_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("disagg_requests", "Requests that ended, by finish reason and gRPC status",
                                ["finish_reason", "status"], registry=r)
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("disagg_generation_tokens", "Generated tokens streamed", registry=r)
        self.in_flight = Gauge("disagg_requests_in_flight", "Requests accepted and not yet ended", registry=r)
        labels = ["instance", "role"]
        self.free_blocks = Gauge("disagg_instance_kv_free_blocks", "Free KV blocks", labels, registry=r)
        self.total_blocks = Gauge("disagg_instance_kv_total_blocks", "Usable KV blocks", labels, registry=r)
        self.kv_usage = Gauge("disagg_instance_kv_usage_ratio", "Fraction of KV blocks in use", labels, registry=r)
        self.running = Gauge("disagg_instance_running_requests", "Running requests", labels, registry=r)
        self.waiting = Gauge("disagg_instance_waiting_requests", "Waiting requests", labels, registry=r)
        self.queued_prompt = Gauge("disagg_instance_queued_prompt_tokens", "Prompt tokens not yet computed",
                                   labels, registry=r)
        self.instance_up = Gauge("disagg_instance_up", "1 while the instance serves", labels, registry=r)

    def observe_load(self, instance: str, role: str, load) -> None:
        lbl = (instance, role)
        self.free_blocks.labels(*lbl).set(load.num_free_blocks)
        self.total_blocks.labels(*lbl).set(load.num_total_blocks)
        self.kv_usage.labels(*lbl).set(load.kv_usage)
        self.running.labels(*lbl).set(load.num_running)
        self.waiting.labels(*lbl).set(load.num_waiting)
        self.queued_prompt.labels(*lbl).set(load.queued_prompt_tokens)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return start_http_server(port, addr=addr, registry=self.registry)
