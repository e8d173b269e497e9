from router.migration_types import MigrationRecord, MigrationState, MigrationStats


def record(state=MigrationState.COMMITTED, reason="", downtime=0.01, blocks=3, **kw) -> MigrationRecord:
    rec = MigrationRecord(migration_id=kw.pop("migration_id", "m"), request_id=kw.pop("request_id", "r"),
                          source="decode-0", target="decode-1", state=state, reason=reason,
                          blocks_copied=blocks, downtime_s=downtime, **kw)
    rec.finished_at = rec.started_at + 0.5
    return rec


def test_state_done():
    assert MigrationState.COMMITTED.done and MigrationState.ABORTED.done
    assert not any(s.done for s in (MigrationState.RESERVING, MigrationState.PRECOPY,
                                    MigrationState.STOPPING, MigrationState.COMMITTING))


def test_to_dict_is_plain_and_uses_the_finish_time():
    d = record(downtime=None, stages=2, tokens_moved=40).to_dict()
    assert d["state"] == "committed" and isinstance(d["state"], str)
    assert d["downtime_s"] is None and d["stages"] == 2 and d["tokens_moved"] == 40
    assert abs(d["duration_s"] - 0.5) < 1e-9


def test_empty_snapshot_is_all_zero():
    snap = MigrationStats().snapshot([])
    assert snap["committed"] == snap["aborted"] == snap["blocks_copied"] == 0
    for key in ("last", "mean", "p50", "p99", "max"):
        assert snap[f"downtime_{key}_s"] == 0.0
    assert snap["in_flight"] == [] and snap["aborted_by_reason"] == {}


def test_snapshot_percentiles_over_downtimes():
    stats = MigrationStats()
    # 100 downtimes 1..100 ms, recorded out of order: the last one is 50 ms.
    for ms in [*range(100, 50, -1), *range(1, 51)]:
        stats.record(record(downtime=ms / 1000))
    snap = stats.snapshot([])
    assert snap["committed"] == 100
    assert snap["downtime_last_s"] == 0.050
    assert snap["downtime_p50_s"] == 0.051  # index int(0.5 * 100) of the sorted list
    assert snap["downtime_p99_s"] == 0.100
    assert snap["downtime_max_s"] == 0.100
    assert abs(snap["downtime_mean_s"] - 0.0505) < 1e-12


def test_single_downtime_is_every_percentile():
    stats = MigrationStats()
    stats.record(record(downtime=0.004))
    snap = stats.snapshot([])
    assert snap["downtime_p50_s"] == snap["downtime_p99_s"] == snap["downtime_max_s"] == 0.004


def test_aborts_count_by_reason_prefix_and_copy_no_blocks():
    stats = MigrationStats()
    stats.record(record(blocks=5))
    stats.record(record(MigrationState.ABORTED, reason="timeout: stage 3 after 30s", blocks=7))
    stats.record(record(MigrationState.ABORTED, reason="timeout: reservation", blocks=1))
    stats.record(record(MigrationState.ABORTED, reason="target_dead", downtime=None))
    stats.record(record(MigrationState.ABORTED, reason="", downtime=None))
    snap = stats.snapshot([])
    assert snap["committed"] == 1 and snap["aborted"] == 4
    assert snap["aborted_by_reason"] == {"timeout": 2, "target_dead": 1, "unknown": 1}
    assert snap["blocks_copied"] == 5  # committed migrations only
    assert snap["downtime_max_s"] == 0.01  # aborted downtimes are not counted


def test_committed_without_downtime_counts_but_adds_no_sample():
    stats = MigrationStats()
    stats.record(record(downtime=None))
    snap = stats.snapshot([])
    assert snap["committed"] == 1 and snap["downtime_p99_s"] == 0.0


def test_downtime_window_is_bounded():
    stats = MigrationStats()
    for i in range(5000):
        stats.record(record(downtime=float(i)))
    assert len(stats.downtimes_s) == 4096 and stats.downtimes_s[-1] == 4999.0
    assert stats.snapshot([])["downtime_max_s"] == 4999.0


def test_in_flight_records_are_dicts():
    running = MigrationRecord("m1", "req-1", "decode-0", "decode-1", MigrationState.PRECOPY, stages=1)
    snap = MigrationStats(started=1).snapshot([running])
    assert snap["started"] == 1
    assert snap["in_flight"] == [running.to_dict() | {"duration_s": snap["in_flight"][0]["duration_s"]}]
    assert snap["in_flight"][0]["state"] == "precopy"
