"""What crosses between the two halves of our KV connector, and between engines.

- `RankEndpoint`: a rank's side-channel address and KV geometry, published once at start-up
  (vLLM's handshake metadata: worker -> scheduler side), then by the worker actor to peers.
- `DisaggMetadata`: the scheduler side's decisions for one engine step (vLLM's connector
  metadata, identical for every rank): holds to announce or drop, loads and migration pulls to
  run, held requests whose blocks may be freed.
- `RankReport`: what one rank reports back each step besides finished/failed transfers
  (vLLM's worker metadata, aggregated over ranks): migration pulls done, byte counters.
Nothing else is shared between vLLM's scheduler process and its rank processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass(frozen=True)
class RankEndpoint(KVConnectorHandshakeMetadata):
    rank: int
    tp_size: int
    host: str
    port: int
    pid: int
    total_kv_heads: int
    local_kv_heads: int
    # KVCacheView.signature(): layer names, shapes without blocks and heads, dtypes.
    signature: tuple

    def to_wire(self) -> dict:
        """Plain data, for processes that must not import vLLM (front ends)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, data: dict) -> RankEndpoint:
        return cls(**data)


@dataclass(frozen=True)
class SourceSpec:
    """Where a transfer's blocks live: every rank of the source engine."""

    instance_id: str
    ranks: tuple[RankEndpoint, ...]

    @property
    def tp_size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class LoadSpec:
    """Copy the source's hold `transfer_id` into `block_ids` of this engine (every rank its
    share). `key` names the load in reports: vLLM's request id for a KV hand-off, the pull id for
    a migration stage."""

    key: str
    transfer_id: str
    block_ids: tuple[int, ...]
    source: SourceSpec | None  # None: the source could not be reached; the load fails at once
    deadline: float  # time.time() by which it must be done


@dataclass(frozen=True)
class PushTarget:
    """Where a prefill pushes a request's KV layer by layer (Splitwise): the decode engine's ranks
    and the blocks it reserved for the request, in sequence order."""

    instance_id: str
    ranks: tuple[RankEndpoint, ...]
    block_ids: tuple[int, ...]

    def to_wire(self) -> dict:
        """Plain data: it travels through a front end in the request's KV parameters."""
        return {"instance_id": self.instance_id, "ranks": [r.to_wire() for r in self.ranks],
                "block_ids": list(self.block_ids)}

    @classmethod
    def from_wire(cls, data: dict) -> PushTarget:
        return cls(data["instance_id"], tuple(RankEndpoint.from_wire(r) for r in data["ranks"]),
                   tuple(data["block_ids"]))


@dataclass(frozen=True)
class PushStep:
    """The blocks of a pushing request that this engine step writes (at sequence positions
    `positions`, this engine's `src_block_ids`): every rank pushes each layer's share of them
    as soon as the layer is computed."""

    transfer_id: str
    target: PushTarget
    positions: tuple[int, ...]
    src_block_ids: tuple[int, ...]


@dataclass
class DisaggMetadata(KVConnectorMetadata):
    # transfer id -> block ids this engine now holds for a peer to pull (announced to every rank).
    new_holds: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dropped_holds: list[str] = field(default_factory=list)
    # Requests whose held blocks may be freed now (every rank reports them as finished sending).
    finished_sending: list[str] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    pulls: list[LoadSpec] = field(default_factory=list)
    # Layer-wise push, source side: what this step writes of pushing requests, and pushes whose
    # prefill finished (every rank tells the destination once its last layer is sent).
    pushes: list[PushStep] = field(default_factory=list)
    pushes_done: list[tuple[str, PushTarget]] = field(default_factory=list)
    # Destination side: transfer id -> reserved blocks pushes may write; pushes given up.
    expect_pushes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dropped_pushes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.new_holds or self.dropped_holds or self.finished_sending or self.loads or self.pulls
                    or self.pushes or self.pushes_done or self.expect_pushes or self.dropped_pushes)


@dataclass
class PullResult:
    key: str
    ok: bool
    nbytes: int
    error: str = ""


@dataclass
class RankReport(KVConnectorWorkerMetadata):
    pulls: list[PullResult] = field(default_factory=list)
    bytes_received: int = 0
    bytes_sent: int = 0
    transfers_out: int = 0
    # Pushes this rank received completely (or saw fail), keyed by transfer id.
    pushes: list[PullResult] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> RankReport:
        assert isinstance(other, RankReport)
        return RankReport(self.pulls + other.pulls, self.bytes_received + other.bytes_received,
                          self.bytes_sent + other.bytes_sent, self.transfers_out + other.transfers_out,
                          self.pushes + other.pushes)
