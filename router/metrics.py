"""Prometheus metrics of the router: request latencies, outcomes, per-instance load, migrations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.migration_types import MigrationRecord, MigrationState

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                  0.5, 0.75, 1.0, 2.0, 5.0)
# Migration downtime is a few decode steps when pre-copy works (ms) and a whole KV copy when it
# does not (up to seconds).
_DOWNTIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                     0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


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
        self.replays = Counter("disagg_request_replays", "Requests replayed after an instance died", registry=r)
        self.rejected = Counter("disagg_requests_rejected", "Requests refused by admission control", registry=r)
        self.in_flight = Gauge("disagg_requests_in_flight", "Requests accepted and not yet ended", registry=r)
        self.handoff = Histogram("disagg_prefill_to_decode_handoff_seconds",
                                 "From the prefill's first token to the decode's next tokens (KV transfer "
                                 "plus one decode step)", buckets=_LATENCY_BUCKETS, registry=r)
        self.migrations = Counter("disagg_migrations", "Finished live migrations by outcome and trigger",
                                  ["outcome", "trigger"], registry=r)
        self.migration_aborts = Counter("disagg_migration_aborts",
                                        "Aborted live migrations by reason (the part before ':')",
                                        ["reason"], registry=r)
        self.migration_downtime = Histogram("disagg_migration_downtime_seconds",
                                            "From the source's last token to the destination's first",
                                            buckets=_DOWNTIME_BUCKETS, registry=r)
        self.migration_duration = Histogram("disagg_migration_duration_seconds",
                                            "Whole migration, reservation to commit or abort",
                                            ["outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.migration_blocks = Counter("disagg_migration_blocks_copied",
                                        "KV blocks copied by committed migrations", registry=r)

    def observe_migration(self, record: MigrationRecord) -> None:
        """Called by the router once per finished migration."""
        outcome = "committed" if record.state == MigrationState.COMMITTED else "aborted"
        self.migrations.labels(outcome=outcome, trigger=record.trigger or "unknown").inc()
        self.migration_duration.labels(outcome=outcome).observe(record.duration_s)
        if outcome == "aborted":
            # The prefix only: reasons carry details (ids, numbers) that would explode the labels.
            self.migration_aborts.labels(reason=record.reason.split(":", 1)[0] or "unknown").inc()
        else:
            self.migration_blocks.inc(record.blocks_copied)
        if record.downtime_s is not None:
            self.migration_downtime.observe(record.downtime_s)

    def e2e_count_sum(self) -> tuple[float, float]:
        count = total = 0.0
        for metric in self.e2e.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    total = sample.value
        return count, total

    def watch(self, router) -> None:
        """Per-instance load and KV-transfer figures, read from the router at scrape time."""
        self.registry.register(_InstanceCollector(router))

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return start_http_server(port, addr=addr, registry=self.registry)


_GAUGES = (
    ("kv_free_blocks", "Free KV blocks", lambda r: r.num_free_blocks),
    ("kv_total_blocks", "Usable KV blocks", lambda r: r.num_total_blocks),
    ("kv_usage_ratio", "Fraction of KV blocks in use", lambda r: r.kv_usage),
    ("running_requests", "Running requests", lambda r: r.num_running),
    ("waiting_requests", "Waiting requests", lambda r: r.num_waiting),
    ("queued_prompt_tokens", "Prompt tokens not yet computed", lambda r: r.queued_prompt_tokens),
    ("spec_acceptance_rate", "Accepted / verified draft tokens", lambda r: r.spec.get("acceptance_rate", 0.0)),
    ("spec_mean_accepted_per_request_step", "Accepted draft tokens per request-step",
     lambda r: r.spec.get("mean_accepted_per_request_step", 0.0)),
)
_COUNTERS = (
    ("generated_tokens", "Tokens generated by the engine", lambda r: r.tokens_generated),
    ("prompt_tokens_computed", "Prompt tokens computed by this engine (not transferred)",
     lambda r: r.prompt_tokens_computed),
    ("kv_transfer_bytes_received", "KV bytes received", lambda r: r.kv.get("bytes_received", 0)),
    ("kv_transfer_bytes_sent", "KV bytes exported", lambda r: r.kv.get("bytes_sent", 0)),
    ("kv_transfers_received", "KV transfers completed into this instance", lambda r: r.kv.get("transfers_in", 0)),
    ("kv_transfer_failures", "KV transfers that failed or missed their deadline", lambda r: r.kv.get("failures", 0)),
    ("kv_transfer_seconds", "Time spent receiving KV (sum over transfers)",
     lambda r: r.kv.get("seconds_in_total", 0.0)),
    ("kv_expired_holds", "Held KV blocks freed because nobody fetched them", lambda r: r.kv.get("expired_holds", 0)),
    ("spec_draft_tokens_proposed", "Draft tokens proposed", lambda r: r.spec.get("proposed", 0)),
    ("spec_draft_tokens_verified", "Draft tokens sent to verification", lambda r: r.spec.get("verified", 0)),
    ("spec_draft_tokens_accepted", "Draft tokens accepted", lambda r: r.spec.get("accepted", 0)),
    ("spec_request_steps", "Decode request-steps that verified drafts",
     lambda r: r.spec.get("verified_request_steps", 0)),
)


class _InstanceCollector:
    def __init__(self, router):
        self.router = router

    def collect(self):
        labels = ["instance", "role"]
        up = GaugeMetricFamily("disagg_instance_up", "1 while the instance serves", labels=labels)
        gauges = [GaugeMetricFamily(f"disagg_instance_{n}", h, labels=labels) for n, h, _ in _GAUGES]
        counters = [CounterMetricFamily(f"disagg_instance_{n}", h, labels=labels) for n, h, _ in _COUNTERS]
        for inst in list(self.router.instances.values()):
            lbl = [inst.instance_id, inst.role]
            up.add_metric(lbl, 1.0 if inst.ready else 0.0)
            if inst.load is None:
                continue
            for family, (_, _, get) in zip(gauges, _GAUGES, strict=True):
                family.add_metric(lbl, float(get(inst.load)))
            for family, (_, _, get) in zip(counters, _COUNTERS, strict=True):
                family.add_metric(lbl, float(get(inst.load)))
        yield up
        yield from gauges
        yield from counters
        snapshot = getattr(self.router, "migration_snapshot", None)
        if snapshot is not None:
            in_flight = GaugeMetricFamily("disagg_migrations_in_flight", "Live migrations under way")
            in_flight.add_metric([], float(len(snapshot()["in_flight"])))
            yield in_flight
