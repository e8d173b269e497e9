"""Prometheus metrics of the router: request latencies, outcomes, per-instance load, migrations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

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


# Families the global scheduler owns (live migration, autoscaling); a front end re-exports them.
SCHEDULER_PREFIXES = ("disagg_migration", "disagg_autoscaler", "disagg_routing")


class RouterMetrics:
    """A front end's metrics (requests, tokens, per-instance load as its polls see it); the
    global scheduler keeps one too, for live migration's families, which every front end
    re-exports from the scheduler's heartbeat replies (`watch_scheduler`)."""

    def __init__(self, registry: CollectorRegistry | None = None, migrations: bool = True):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # A front end does not register the migration families itself: they come from the
        # scheduler (one source, so no duplicate series).
        mr = r if migrations else CollectorRegistry()
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
        self.kv_handoffs = Counter("disagg_kv_handoffs", "Prefill -> decode hand-offs by how the KV moved: pull, "
                                   "pushed (layer-wise), pulled (a push that fell back to pulling), "
                                   "pull_no_reservation (no decode room at dispatch)", ["mode"], registry=r)
        self.handoff = Histogram("disagg_prefill_to_decode_handoff_seconds",
                                 "From the prefill's first token to the decode's next tokens (KV transfer "
                                 "plus one decode step)", buckets=_LATENCY_BUCKETS, registry=r)
        self.migrations = Counter("disagg_migrations", "Finished live migrations by outcome and trigger",
                                  ["outcome", "trigger"], registry=mr)
        self.migration_aborts = Counter("disagg_migration_aborts",
                                        "Aborted live migrations by reason (the part before ':')",
                                        ["reason"], registry=mr)
        self.migration_downtime = Histogram("disagg_migration_downtime_seconds",
                                            "From the source's last token to the destination's first",
                                            buckets=_DOWNTIME_BUCKETS, registry=mr)
        self.migration_duration = Histogram("disagg_migration_duration_seconds",
                                            "Whole migration, reservation to commit or abort",
                                            ["outcome"], buckets=_LATENCY_BUCKETS, registry=mr)
        self.migration_blocks = Counter("disagg_migration_blocks_copied",
                                        "KV blocks copied by committed migrations", registry=mr)
        self.routing = Counter("disagg_routing_decisions",
                               "Prompt dispatch decisions (prefill / colocated) by reason: session, prefix, "
                               "load, load_over_prefix, load_over_session (router/prefix_index.py)",
                               ["role", "reason"], registry=mr)
        self.routing_cached_tokens = Counter("disagg_routing_cached_tokens",
                                             "Prompt tokens the chosen instance's prefix cache was expected to hold",
                                             ["role"], registry=mr)

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

    def watch_scheduler(self, text_source) -> None:
        """Re-exports the scheduler's migration families; `text_source()` returns their latest
        exposition text (from the last heartbeat), or "" when none arrived yet."""
        self.registry.register(_TextCollector(text_source))

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return start_http_server(port, addr=addr, registry=self.registry)


def migration_metrics_text(metrics: RouterMetrics) -> str:
    """The exposition text of the scheduler's own families in `metrics`' registry (live
    migration, autoscaling), which the front ends re-export."""
    text = generate_latest(metrics.registry).decode()
    keep, lines = False, []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            keep = line.split()[2].startswith(SCHEDULER_PREFIXES)
        elif not line.startswith("#"):
            keep = line.startswith(SCHEDULER_PREFIXES)
        if keep:
            lines.append(line)
    return "\n".join(lines) + "\n" if lines else ""


class _TextCollector:
    def __init__(self, text_source):
        self.text_source = text_source

    def collect(self):
        text = self.text_source() or ""
        if text:
            yield from text_string_to_metric_families(text)


_GAUGES = (
    ("kv_free_blocks", "Free KV blocks", lambda r: r.num_free_blocks),
    ("kv_total_blocks", "Usable KV blocks", lambda r: r.num_total_blocks),
    ("kv_usage_ratio", "Fraction of KV blocks in use", lambda r: r.kv_usage),
    ("running_requests", "Running requests", lambda r: r.num_running),
    ("waiting_requests", "Waiting requests", lambda r: r.num_waiting),
    ("queued_prompt_tokens", "Prompt tokens not yet computed", lambda r: r.queued_prompt_tokens),
    ("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up",
     lambda r: r.prefix.get("hit_tokens_device", 0) / max(1, r.prefix.get("query_tokens", 0))),
    ("prefix_cached_blocks", "Prompt prefixes (full blocks) the engine's KV cache holds",
     lambda r: r.prefix.get("cached_blocks", 0)),
    ("spec_acceptance_rate", "Accepted / verified draft tokens", lambda r: r.spec.get("acceptance_rate", 0.0)),
    ("spec_mean_accepted_per_request_step", "Accepted draft tokens per request-step",
     lambda r: r.spec.get("mean_accepted_per_request_step", 0.0)),
    ("spec_calibration_brier_raw", "Brier score of the raw draft probability as acceptance estimate",
     lambda r: r.spec.get("calibration_brier_raw", 0.0)),
    ("spec_calibration_brier_calibrated", "Brier score of the calibrated acceptance probability",
     lambda r: r.spec.get("calibration_brier_calibrated", 0.0)),
    ("spec_step_time_predicted_ms", "Mean predicted engine step time (SmartSpec's model)",
     lambda r: r.spec.get("step_time_predicted_mean_ms", 0.0)),
    ("spec_step_time_measured_ms", "Mean measured engine step time (steps the model predicted)",
     lambda r: r.spec.get("step_time_measured_mean_ms", 0.0)),
    ("spec_step_time_abs_error_ms", "Mean absolute error of the predicted step time",
     lambda r: r.spec.get("step_time_abs_error_mean_ms", 0.0)),
)
_COUNTERS = (
    ("generated_tokens", "Tokens generated by the engine", lambda r: r.tokens_generated),
    ("prompt_tokens_computed", "Prompt tokens computed by this engine (not transferred)",
     lambda r: r.prompt_tokens_computed),
    ("prefix_query_tokens", "Prompt tokens looked up in the prefix cache (prefix caching on)",
     lambda r: r.prefix.get("query_tokens", 0)),
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
    ("spec_steps_without_speculation", "Draft-selection decisions that verify no draft",
     lambda r: r.spec.get("steps_without_speculation", 0)),
    ("spec_draft_skipped_steps", "Engine steps in which the draft model did not run",
     lambda r: r.spec.get("draft_skipped_steps", 0)),
    ("spec_explorations", "Steps speculated only to keep SmartSpec's estimates fresh",
     lambda r: r.spec.get("explorations", 0)),
)


def _spec_budget_histogram(loads) -> HistogramMetricFamily:
    """Draft tokens verified per step (SmartSpec's budget), from the engines' bucket counts."""
    family = HistogramMetricFamily("disagg_instance_spec_budget_tokens",
                                   "Draft tokens a decision sends to verification per step",
                                   labels=["instance", "role"])
    for labels, spec in loads:
        bounds, counts = spec.get("budget_bucket_bounds"), spec.get("budget_bucket_counts")
        if not bounds or not counts:
            continue
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, counts, strict=True):
            cumulative += int(count)
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric(labels, buckets, float(spec.get("budget_sum", 0)))
    return family


class _InstanceCollector:
    def __init__(self, router):
        self.router = router

    def collect(self):
        labels = ["instance", "role"]
        up = GaugeMetricFamily("disagg_instance_up", "1 while the instance serves", labels=labels)
        gauges = [GaugeMetricFamily(f"disagg_instance_{n}", h, labels=labels) for n, h, _ in _GAUGES]
        counters = [CounterMetricFamily(f"disagg_instance_{n}", h, labels=labels) for n, h, _ in _COUNTERS]
        spec_loads = []
        hits = CounterMetricFamily("disagg_instance_prefix_cache_hit_tokens",
                                   "Prompt tokens served from a prefix cache, by tier (device: the engine's "
                                   "own KV cache)", labels=[*labels, "tier"])
        for inst in list(self.router.instances.values()):
            lbl = [inst.instance_id, inst.role]
            up.add_metric(lbl, 1.0 if inst.ready else 0.0)
            if inst.load is None:
                continue
            if inst.load.spec:
                spec_loads.append((lbl, inst.load.spec))
            for key, value in inst.load.prefix.items():
                if key.startswith("hit_tokens_"):
                    hits.add_metric([*lbl, key.removeprefix("hit_tokens_")], float(value))
            for family, (_, _, get) in zip(gauges, _GAUGES, strict=True):
                family.add_metric(lbl, float(get(inst.load)))
            for family, (_, _, get) in zip(counters, _COUNTERS, strict=True):
                family.add_metric(lbl, float(get(inst.load)))
        yield up
        yield from gauges
        yield from counters
        yield hits
        yield _spec_budget_histogram(spec_loads)
        snapshot = getattr(self.router, "migration_snapshot", None)
        if snapshot is not None:
            in_flight = GaugeMetricFamily("disagg_migrations_in_flight", "Live migrations under way")
            in_flight.add_metric([], float(len(snapshot()["in_flight"])))
            yield in_flight
