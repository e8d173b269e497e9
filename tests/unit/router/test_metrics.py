from router.metrics import RouterMetrics
from router.migration_types import MigrationRecord, MigrationState, MigrationStats


def record(state, reason="", trigger="admin", downtime=None, blocks=0, duration=0.2) -> MigrationRecord:
    rec = MigrationRecord("m", "r", "decode-0", "decode-1", state, reason, trigger,
                          blocks_copied=blocks, downtime_s=downtime)
    rec.finished_at = rec.started_at + duration
    return rec


def sample(metrics: RouterMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_observe_migration_counts_outcomes_reasons_and_latencies():
    m = RouterMetrics()
    m.observe_migration(record(MigrationState.COMMITTED, downtime=0.004, blocks=10, duration=0.3))
    m.observe_migration(record(MigrationState.COMMITTED, trigger="balance", downtime=0.02, blocks=5))
    m.observe_migration(record(MigrationState.ABORTED, reason="timeout: stage 3 after 30.0s", trigger="drain"))
    m.observe_migration(record(MigrationState.ABORTED, reason="timeout: reservation"))
    m.observe_migration(record(MigrationState.ABORTED, reason=""))

    assert sample(m, "disagg_migrations_total", outcome="committed", trigger="admin") == 1
    assert sample(m, "disagg_migrations_total", outcome="committed", trigger="balance") == 1
    assert sample(m, "disagg_migrations_total", outcome="aborted", trigger="drain") == 1
    assert sample(m, "disagg_migrations_total", outcome="aborted", trigger="admin") == 2
    assert sample(m, "disagg_migration_aborts_total", reason="timeout") == 2
    assert sample(m, "disagg_migration_aborts_total", reason="unknown") == 1
    assert sample(m, "disagg_migration_blocks_copied_total") == 15
    # Downtime only where it is known; ms-scale samples land in ms-scale buckets.
    assert sample(m, "disagg_migration_downtime_seconds_count") == 2
    assert sample(m, "disagg_migration_downtime_seconds_bucket", le="0.005") == 1
    assert abs(sample(m, "disagg_migration_downtime_seconds_sum") - 0.024) < 1e-12
    assert sample(m, "disagg_migration_duration_seconds_count", outcome="committed") == 2
    assert sample(m, "disagg_migration_duration_seconds_count", outcome="aborted") == 3
    assert abs(sample(m, "disagg_migration_duration_seconds_sum", outcome="committed") - 0.5) < 1e-9


class FakeRouter:
    def __init__(self, in_flight):
        self.instances: dict = {}
        self.in_flight = in_flight

    def migration_snapshot(self):
        return MigrationStats().snapshot(self.in_flight)


def test_in_flight_gauge_reads_the_router_at_scrape_time():
    m = RouterMetrics()
    router = FakeRouter([])
    m.watch(router)
    assert sample(m, "disagg_migrations_in_flight") == 0
    router.in_flight = [record(MigrationState.PRECOPY), record(MigrationState.STOPPING)]
    assert sample(m, "disagg_migrations_in_flight") == 2


def test_speculation_counters_and_budget_histogram_come_from_the_load_reports():
    from types import SimpleNamespace

    from cluster.protocol import LoadReport
    from decode_worker.spec_stats import TetrisStats

    stats = TetrisStats(num_speculative_tokens=4, budget_mode="goodput")
    for budget in (0, 0, 3, 12, 40):
        stats.add_budget(budget)
    stats.draft_skipped_steps, stats.calibration_brier_raw = 2, 0.4
    load = LoadReport(instance_id="decode-0", num_total_blocks=10, num_free_blocks=10, num_running=0,
                      num_waiting=0, queued_prompt_tokens=0, spec=stats.snapshot())
    router = FakeRouter([])
    router.instances["decode-0"] = SimpleNamespace(instance_id="decode-0", role="decode", ready=True, load=load)
    m = RouterMetrics()
    m.watch(router)
    lbl = {"instance": "decode-0", "role": "decode"}
    assert sample(m, "disagg_instance_spec_steps_without_speculation_total", **lbl) == 2
    assert sample(m, "disagg_instance_spec_draft_skipped_steps_total", **lbl) == 2
    assert sample(m, "disagg_instance_spec_calibration_brier_raw", **lbl) == 0.4
    assert sample(m, "disagg_instance_spec_budget_tokens_count", **lbl) == 5
    assert sample(m, "disagg_instance_spec_budget_tokens_sum", **lbl) == 55
    assert sample(m, "disagg_instance_spec_budget_tokens_bucket", le="0.0", **lbl) == 2
    assert sample(m, "disagg_instance_spec_budget_tokens_bucket", le="4.0", **lbl) == 3
    assert sample(m, "disagg_instance_spec_budget_tokens_bucket", le="16.0", **lbl) == 4
    assert sample(m, "disagg_instance_spec_budget_tokens_bucket", le="+Inf", **lbl) == 5
