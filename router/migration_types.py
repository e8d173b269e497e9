"""What the outside world sees of migrations: one record per migration, drain results, and the
counters behind status and metrics. The protocol itself is in router/migration.py."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class MigrationState(str, enum.Enum):
    RESERVING = "reserving"    # destination pre-allocates blocks for what is already computed
    PRECOPY = "precopy"        # stages copy full blocks while the source keeps decoding
    STOPPING = "stopping"      # source stops the request and holds its tail blocks
    COMMITTING = "committing"  # destination copies the tail and resumes the request
    COMMITTED = "committed"    # the request runs on the destination; the source freed it
    ABORTED = "aborted"        # the request stays (or, if the source already stopped, replays)

    @property
    def done(self) -> bool:
        return self in (MigrationState.COMMITTED, MigrationState.ABORTED)


@dataclass
class MigrationRecord:
    migration_id: str
    request_id: str
    source: str
    target: str
    state: MigrationState = MigrationState.RESERVING
    # Why it aborted (empty unless state is ABORTED).
    reason: str = ""
    # What triggered it: admin (Migrate RPC), drain, balance (freeness pairing).
    trigger: str = "admin"
    stages: int = 0
    blocks_copied: int = 0
    # KV tokens the destination received (source's computed tokens at the stop).
    tokens_moved: int = 0
    # Source's last token before the stop -> destination's first token after it.
    downtime_s: float | None = None
    # Where the downtime went (see MigrationInfo.phases_s in proto/disagg.proto).
    phases_s: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None

    @property
    def duration_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at

    def to_dict(self) -> dict:
        return {
            "migration_id": self.migration_id, "request_id": self.request_id,
            "source": self.source, "target": self.target, "state": self.state.value,
            "reason": self.reason, "trigger": self.trigger, "stages": self.stages,
            "blocks_copied": self.blocks_copied, "tokens_moved": self.tokens_moved,
            "downtime_s": self.downtime_s, "duration_s": self.duration_s,
            "phases_s": {k: v for k, v in self.phases_s.items() if not k.startswith("_")},
        }


@dataclass
class DrainResult:
    instance_id: str
    migrated: int = 0
    # Requests still on the instance when the drain returned (deadline, or nowhere to go).
    remaining: int = 0
    failed: int = 0
    migrations: list[MigrationRecord] = field(default_factory=list)


@dataclass
class MigrationStats:
    started: int = 0
    committed: int = 0
    aborted_by_reason: dict[str, int] = field(default_factory=dict)
    downtimes_s: list[float] = field(default_factory=list)
    blocks_copied: int = 0

    def record(self, rec: MigrationRecord) -> None:
        if rec.state == MigrationState.COMMITTED:
            self.committed += 1
            self.blocks_copied += rec.blocks_copied
            if rec.downtime_s is not None:
                self.downtimes_s.append(rec.downtime_s)
                del self.downtimes_s[:-4096]
        else:
            key = rec.reason.split(":", 1)[0] or "unknown"
            self.aborted_by_reason[key] = self.aborted_by_reason.get(key, 0) + 1

    @property
    def aborted(self) -> int:
        return sum(self.aborted_by_reason.values())

    def snapshot(self, in_flight: list[MigrationRecord]) -> dict:
        d = sorted(self.downtimes_s)

        def pct(q: float) -> float:
            return d[min(len(d) - 1, int(q * len(d)))] if d else 0.0

        return {
            "started": self.started, "committed": self.committed, "aborted": self.aborted,
            "aborted_by_reason": dict(self.aborted_by_reason), "blocks_copied": self.blocks_copied,
            "downtime_last_s": self.downtimes_s[-1] if self.downtimes_s else 0.0,
            "downtime_mean_s": sum(d) / len(d) if d else 0.0,
            "downtime_p50_s": pct(0.5), "downtime_p99_s": pct(0.99),
            "downtime_max_s": d[-1] if d else 0.0,
            "in_flight": [r.to_dict() for r in in_flight],
        }
