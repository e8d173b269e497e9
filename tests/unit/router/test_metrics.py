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
