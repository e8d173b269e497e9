"""Typed configuration: one source of truth, passed down from the CLI to every actor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineConfig:
    """How one vLLM engine instance is built (the same for every instance of a pool)."""

    model: str
    tokenizer: str | None = None
    max_model_len: int = 1024
    # None lets vLLM choose (128 on CPU, 16 on GPU).
    block_size: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    # Off: freed blocks then really are free, which keeps load reports honest.
    enable_prefix_caching: bool = False
    dtype: str = "auto"
    seed: int = 0
    # CPU: GiB of host memory for the KV cache (VLLM_CPU_KVCACHE_SPACE) per instance.
    cpu_kv_cache_gib: float = 0.5
    # GPU: fraction of device memory vLLM may take.
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True
    # A worker whose router stopped polling this long frees its requests (the router died).
    orphan_timeout_s: float = 60.0

    def engine_kwargs(self) -> dict:
        """Keyword arguments for vllm.EngineArgs."""
        kwargs = dict(
            model=self.model,
            tokenizer=self.tokenizer or self.model,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enable_chunked_prefill=self.enable_chunked_prefill,
            enable_prefix_caching=self.enable_prefix_caching,
            dtype=self.dtype,
            seed=self.seed,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            disable_log_stats=False,
        )
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        return kwargs


# KV transports by name (cluster/kv/transports/); see TransferConfig.transport.
KV_TRANSPORTS = ("auto", "shm", "ray", "nccl")
KV_FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class TransferConfig:
    """KV-cache transfer between instances (prefill -> decode, and later decode -> decode)."""

    # auto: shared memory between engines on one host, Ray's object store across hosts;
    # shm / ray: force one of those (CPU caches); nccl: CuPy NCCL (GPU caches).
    transport: str = "auto"
    # Deadline for one request's KV to arrive at the destination.
    timeout_s: float = 30.0
    # A source frees blocks nobody fetched after this long (the destination died).
    hold_timeout_s: float = 60.0
    # What a destination does when a transfer fails or misses its deadline:
    # recompute (prefill locally, the request still succeeds) or fail (error to the client).
    failure_policy: str = "recompute"

    def __post_init__(self):
        if self.transport not in KV_TRANSPORTS:
            raise ValueError(f"unknown KV transport {self.transport!r}: choose one of {', '.join(KV_TRANSPORTS)}")
        if self.failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"unknown transfer failure policy {self.failure_policy!r}: recompute or fail")


@dataclass(frozen=True)
class SpecConfig:
    """Draft-model speculative decoding with TETRIS draft selection (decode-side engines)."""

    # None: no speculative decoding.
    draft_model: str | None = None
    # Window k of standard speculative decoding; the default budget is k tokens per request.
    k: int = 3
    # Extra proposals e: the draft proposes k + e tokens, TETRIS keeps the best k*N in the batch.
    extra: int = 1
    # Verification budget per step in draft tokens (None: N * k).
    capacity: int | None = None
    tetris: bool = True
    # Below this batch size every request verifies plain window k.
    min_batch_size: int = 2

    @property
    def enabled(self) -> bool:
        return self.draft_model is not None

    @property
    def num_speculative_tokens(self) -> int:
        """Drafts proposed per request and step (vLLM's num_speculative_tokens): k + e."""
        return self.k + self.extra

    def __post_init__(self):
        if self.k < 1 or self.extra < 0:
            raise ValueError(f"speculative decoding needs k >= 1 and extra >= 0 (got k={self.k}, "
                             f"extra={self.extra})")
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"spec capacity must be >= 0, got {self.capacity}")


POOL_RESOURCES = {"prefill": "disagg_prefill", "decode": "disagg_decode", "colocated": None}


@dataclass(frozen=True)
class PoolConfig:
    """Instances of one role and the Ray resources each one asks for."""

    role: str  # colocated | prefill | decode
    num_instances: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Custom Ray resource the nodes of this pool advertise (explicit placement).
    resource: str | None = None


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = None
    # Used when a request leaves max_tokens unset; clipped to the context left.
    default_max_tokens: int = 256
    # 0 means: the model's max length minus one.
    max_prompt_tokens: int = 0
    # Largest max_tokens a request may ask for (0: whatever fits the model's length).
    max_tokens_limit: int = 0
    # Admission control: requests in flight at once; past it RESOURCE_EXHAUSTED + retry hint.
    max_in_flight: int = 512
    # Optional TLS (PEM files) and bearer token for the gRPC port.
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    # Longest a poll of an idle instance waits; output returns as soon as it exists.
    poll_wait_s: float = 0.5
    # Deadline for any single call to a worker actor (add, abort, load).
    actor_call_timeout_s: float = 30.0
    # Deadline for instances to start (model load).
    startup_timeout_s: float = 600.0
    # Times a request is replayed on another instance after the one serving it died.
    max_replays: int = 2
    # Replace dead instances with fresh ones (same id, same pool).
    respawn_dead: bool = True
    # How long a request waits for an instance of the role it needs while all are restarting.
    instance_wait_s: float = 120.0


SELECTION_POLICIES = ("last", "shortest", "longest")


@dataclass(frozen=True)
class FreenessConfig:
    """Thresholds of the freeness policy (router/freeness.py). Freeness is in KV blocks per
    running request."""

    high_priority_headroom_blocks: int = 0
    """Blocks reserved on *every* instance for high-priority requests, whether or not one runs
    there now: the room must exist before a high-priority request arrives, or normal requests
    would already have filled it. Normal-priority requests and the migration pairing see
    ``free - headroom``; high-priority requests see all free blocks. An instance whose normal
    load eats into the headroom gets a negative freeness and becomes a migration source, which
    restores the headroom. 0 (the default) turns the reservation off."""

    high_priority_threshold: int = 1
    """A request is high-priority when its priority is >= this (0 is normal)."""

    migrate_out_threshold: float = 2.0
    """An instance is a migration source when its freeness is below this: its running requests
    have fewer than two free blocks each left to grow into (after virtual usage). Draining
    instances with running requests are sources whatever their freeness."""

    migrate_in_threshold: float = 8.0
    """An instance is a migration destination when its freeness is above this. Must be >=
    ``migrate_out_threshold``; the gap between the two keeps a moved request from bouncing
    back."""

    max_pairs_per_round: int = 4
    """At most this many (source, destination) pairs per pairing round."""

    selection: str = "last"
    """Which request a source gives up: "last" (the most recently arrived, which has the fewest
    blocks to copy, like Llumnix's LCR), "shortest" (fewest blocks), "longest" (most blocks:
    frees the most room in one move)."""

    running_floor: int = 1
    """The freeness denominator is ``max(num_running, running_floor)``: never zero, and equal to
    the running count on a busy instance."""

    def __post_init__(self) -> None:
        if self.selection not in SELECTION_POLICIES:
            raise ValueError(
                f"selection must be one of {SELECTION_POLICIES}, got {self.selection!r}")
        if self.running_floor < 1:
            raise ValueError(f"running_floor must be >= 1, got {self.running_floor}")
        if self.high_priority_headroom_blocks < 0:
            raise ValueError("high_priority_headroom_blocks must be >= 0")
        if self.max_pairs_per_round < 0:
            raise ValueError("max_pairs_per_round must be >= 0")
        if self.migrate_in_threshold < self.migrate_out_threshold:
            raise ValueError(
                f"migrate_in_threshold ({self.migrate_in_threshold}) must be >= "
                f"migrate_out_threshold ({self.migrate_out_threshold})")


@dataclass(frozen=True)
class MigrationConfig:
    """Live migration of running requests between decode instances (Llumnix) and the freeness
    policy that drives it. Thresholds are in KV blocks per running request."""

    # Periodic load balancing: pair busy sources with free destinations every interval. (The
    # Migrate and Drain admin RPCs work either way.)
    enabled: bool = True
    interval_s: float = 0.5
    migrate_out_threshold: float = 2.0
    migrate_in_threshold: float = 8.0
    max_pairs_per_round: int = 4
    # Which request a source gives up: last | shortest | longest.
    selection: str = "last"
    # Blocks kept free on every decode instance for high-priority requests (0: off).
    high_priority_headroom_blocks: int = 0
    # priority >= this is high-priority.
    high_priority_threshold: int = 1
    # Stop-and-copy once fewer than this many new full blocks were filled in the last stage...
    stop_copy_blocks: int = 1
    # ...or after this many pre-copy stages.
    max_stages: int = 4
    # Deadline for one whole migration; the destination frees an uncommitted reservation after
    # reservation_timeout_s (source or router gone).
    timeout_s: float = 30.0
    reservation_timeout_s: float = 60.0
    # Blocks a destination keeps free beyond a reservation (it must still admit new requests).
    reserve_watermark_blocks: int = 1
    # Drain: deadline for moving everything off an instance.
    drain_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s", "reservation_timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):  # also rejects NaN
                raise ValueError(f"migration {name} must be a finite number > 0, got {value}")
        if self.max_stages < 1 or self.stop_copy_blocks < 0 or self.reserve_watermark_blocks < 0:
            raise ValueError("migration needs max_stages >= 1, stop_copy_blocks >= 0 and "
                             "reserve_watermark_blocks >= 0")
        self.freeness()  # validates the policy fields

    def freeness(self) -> FreenessConfig:
        return FreenessConfig(
            high_priority_headroom_blocks=self.high_priority_headroom_blocks,
            high_priority_threshold=self.high_priority_threshold,
            migrate_out_threshold=self.migrate_out_threshold,
            migrate_in_threshold=self.migrate_in_threshold,
            max_pairs_per_round=self.max_pairs_per_round,
            selection=self.selection,
        )


@dataclass(frozen=True)
class ServeConfig:
    """Everything `disagg-serve up` needs."""

    engine: EngineConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    pools: tuple[PoolConfig, ...] = (PoolConfig(role="colocated", num_instances=1),)
    # Ray cluster address; None starts a local Ray instance.
    address: str | None = None
    # Logical CPUs for a local Ray instance (None: enough for the pools).
    local_num_cpus: float | None = None
    # Stream worker logs to the driver's console (Ray's log_to_driver).
    worker_logs_to_driver: bool = True

    def replace(self, **changes) -> ServeConfig:
        return dataclasses.replace(self, **changes)

    def pool(self, role: str) -> PoolConfig | None:
        for pool in self.pools:
            if pool.role == role and pool.num_instances > 0:
                return pool
        return None
