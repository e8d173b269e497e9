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
    # None lets vLLM choose, as its own server does (on CPU 128 sequences and 2048 tokens a step;
    # on GPUs more). A fixed 64 here once cost a burst of 200 requests 2.5x vLLM's median TTFT.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    # vLLM's prefix cache (freed blocks keep their content until reused; vLLM counts them as
    # free, so load reports stay honest). `up` turns it on for prefill and colocated pools
    # (--prefix-caching); decode pools keep it off (cluster/entrypoints/deployment.py says why).
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
    # Ranks of one engine (vLLM tensor parallelism, its multiprocess executor on one node); set
    # per pool by the launcher from PoolConfig.tensor_parallel_size.
    tensor_parallel_size: int = 1

    def engine_kwargs(self) -> dict:
        """Keyword arguments for vllm.EngineArgs."""
        kwargs = dict(
            model=self.model,
            tokenizer=self.tokenizer or self.model,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            enable_prefix_caching=self.enable_prefix_caching,
            dtype=self.dtype,
            seed=self.seed,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            disable_log_stats=False,
        )
        if self.tensor_parallel_size > 1:
            # Explicit: inside a Ray placement group vLLM would pick its Ray executor, whose nested
            # placement groups are a known failure mode; ranks are vLLM's own processes here.
            kwargs["tensor_parallel_size"] = self.tensor_parallel_size
            kwargs["distributed_executor_backend"] = "mp"
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        return kwargs


# KV transports by name (cluster/kv/transports/); see TransferConfig.transport.
KV_TRANSPORTS = ("auto", "shm", "tcp", "nccl")
KV_FAILURE_POLICIES = ("recompute", "fail")


KV_PUSH_MODES = ("pull", "layerwise")


@dataclass(frozen=True)
class TransferConfig:
    """KV-cache transfer between instances (prefill -> decode, and later decode -> decode)."""

    # auto: shared memory between ranks on one host, a TCP stream across hosts;
    # shm / tcp: force one of those (CPU caches); nccl: CuPy NCCL (GPU caches).
    transport: str = "auto"
    # Deadline for one request's KV to arrive at the destination.
    timeout_s: float = 30.0
    # A source frees blocks nobody fetched after this long (the destination died).
    hold_timeout_s: float = 60.0
    # What a destination does when a transfer fails or misses its deadline:
    # recompute (prefill locally, the request still succeeds) or fail (error to the client).
    failure_policy: str = "recompute"
    # How a prefill's KV reaches the decode instance: "pull" (the decode side fetches it once the
    # prefill finished) or "layerwise" (Splitwise: the decode instance is chosen at dispatch,
    # reserves blocks, and the prefill pushes each layer's KV as it computes it).
    push: str = "pull"

    def __post_init__(self):
        if self.push not in KV_PUSH_MODES:
            raise ValueError(f"unknown KV hand-off mode {self.push!r}: choose one of {', '.join(KV_PUSH_MODES)}")
        if self.transport not in KV_TRANSPORTS:
            raise ValueError(f"unknown KV transport {self.transport!r}: choose one of {', '.join(KV_TRANSPORTS)}")
        if self.failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"unknown transfer failure policy {self.failure_policy!r}: recompute or fail")


SPEC_BUDGETS = ("goodput", "fixed")


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
    # Below this batch size every request verifies plain window k (budget "fixed").
    min_batch_size: int = 2
    # "goodput": each step verifies the budget (0..N*(k+e)) with the best predicted goodput
    # (SmartSpec); "fixed": N*k (or capacity) every step.
    budget: str = "goodput"

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
        if self.budget not in SPEC_BUDGETS:
            raise ValueError(f"unknown spec budget {self.budget!r}: choose one of {', '.join(SPEC_BUDGETS)}")


POOL_RESOURCES = {"prefill": "disagg_prefill", "decode": "disagg_decode", "colocated": None}


@dataclass(frozen=True)
class PoolConfig:
    """Instances of one role and the Ray resources each one asks for."""

    role: str  # colocated | prefill | decode
    num_instances: int = 0
    # Per rank: an instance of TP degree t asks Ray for t times these (its ranks are vLLM's own
    # processes on the instance's node, each bound to its own cores / GPU).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Custom Ray resource the nodes of this pool advertise (explicit placement); one per instance.
    resource: str | None = None
    # Tensor-parallel degree of every instance of the pool (DistServe: each phase its own).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"the {self.role} pool's tensor-parallel size must be >= 1, got "
                             f"{self.tensor_parallel_size}")

    @property
    def cpus_per_instance(self) -> float:
        return self.num_cpus * self.tensor_parallel_size

    @property
    def gpus_per_instance(self) -> float:
        return self.num_gpus * self.tensor_parallel_size


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = None
    # The OpenAI-compatible HTTP API (router/openai/), on the same host; None: off, 0: a free port.
    http_port: int | None = None
    # The model's name in the HTTP API (None: the model path, as vLLM names it).
    served_model_name: str | None = None
    # A Jinja chat template (file or text) replacing the tokenizer's own for chat completions.
    chat_template: str | None = None
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
    # Least time between two messages of one stream: tokens that arrive meanwhile go out
    # together in the next one (fewer messages per token: less CPU per token at the cost of up
    # to this much added inter-token latency). 0: every engine step as soon as it arrives.
    stream_interval_s: float = 0.0
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


@dataclass(frozen=True)
class DeploymentConfig:
    """One deployment on a Ray cluster: its engines and global scheduler are detached actors
    named in the Ray namespace `name`, so they outlive the `up` process (a restarted `up` or
    another `disagg-serve frontend` reattaches to them), and any number of front ends serve it."""

    name: str = "disagg-serve"
    # Front ends `up` starts on its node (each a process serving gRPC and the HTTP API).
    frontends: int = 1
    # How often the scheduler reads each engine's snapshot (load, live requests).
    load_interval_s: float = 0.1
    # How often a front end reports to the scheduler (and refreshes its view of the instances).
    heartbeat_s: float = 0.5
    # A front end silent this long is shown as gone (its engines' orphan leases free its KV).
    frontend_timeout_s: float = 10.0
    # Times Ray restarts the scheduler actor after it dies (-1: always).
    scheduler_max_restarts: int = -1

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "/@ \t\n") or len(self.name) > 63:
            raise ValueError(f"deployment name {self.name!r}: 1-63 characters, no spaces, '/' or '@'")
        if self.frontends < 1:
            raise ValueError(f"a deployment needs at least one front end, got {self.frontends}")
        for name in ("load_interval_s", "heartbeat_s", "frontend_timeout_s"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")


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


PREFIX_ROUTING_POLICIES = ("prefix", "load")


@dataclass(frozen=True)
class PrefixRoutingConfig:
    """Where the global scheduler sends a prompt among prefill (or colocated) instances when
    their engines cache prefixes (router/prefix_index.py states the cost model)."""

    # "prefix": the cheapest instance by queued tokens + this prompt's uncached tokens (a cached
    # prefix counts); "load": by queued tokens alone (the cache is ignored when choosing).
    policy: str = "prefix"
    # A request already running on a colocated instance costs this many prompt tokens' worth
    # (its decode steps share the engine); prefill queues are counted in tokens already.
    colocated_request_cost_tokens: int = 128
    # A conversation (session id) stays on the instance of its previous turn while that costs at
    # most this many tokens more than the cheapest; past that, load wins.
    session_slack_tokens: int = 2048
    # Conversations remembered (least recently used forgotten first).
    max_sessions: int = 65536

    def __post_init__(self) -> None:
        if self.policy not in PREFIX_ROUTING_POLICIES:
            raise ValueError(f"unknown prefix routing policy {self.policy!r}: choose one of "
                             f"{', '.join(PREFIX_ROUTING_POLICIES)}")
        if self.colocated_request_cost_tokens < 0 or self.session_slack_tokens < 0 or self.max_sessions < 1:
            raise ValueError("prefix routing needs colocated_request_cost_tokens >= 0, session_slack_tokens >= 0 "
                             "and max_sessions >= 1")


AUTOSCALE_ROLES = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class PoolBounds:
    """How far the autoscaler may resize one pool."""

    role: str
    min_instances: int
    max_instances: int

    def __post_init__(self) -> None:
        if self.role not in AUTOSCALE_ROLES:
            raise ValueError(f"unknown pool {self.role!r}: choose one of {', '.join(AUTOSCALE_ROLES)}")
        if not 0 <= self.min_instances <= self.max_instances or self.max_instances < 1:
            raise ValueError(f"{self.role} pool bounds need 0 <= min <= max and max >= 1, got "
                             f"min={self.min_instances} max={self.max_instances}")


@dataclass(frozen=True)
class AutoscalerConfig:
    """Load-driven pool sizes: router/autoscaler.py decides from observed load against a
    profile's capacity model; the router acts (scale-out starts instances, scale-in drains one
    by live migration and then stops it)."""

    enabled: bool = False
    # Per-pool bounds; a pool without bounds (or with min == max) keeps its size.
    bounds: tuple[PoolBounds, ...] = ()
    # Seconds between evaluations, and the window arrivals and lengths are averaged over.
    interval_s: float = 2.0
    window_s: float = 20.0
    # Scale out when the pool's load exceeds this fraction of its capacity...
    target_utilization: float = 0.75
    # ...and in when one instance fewer would still run below this fraction (the gap between
    # the two is the hysteresis band).
    scale_in_utilization: float = 0.45
    # Consecutive evaluations that must agree before acting (out quickly, in slowly).
    scale_out_after: int = 2
    scale_in_after: int = 5
    # No further change to a pool this long after its last one.
    cooldown_s: float = 30.0
    # Queueing signal: more requests waiting in a pool's engines than this per instance means
    # "add one" whatever the capacity model says.
    max_waiting_per_instance: float = 2.0
    # Memory signal (decode pool): mean Llumnix freeness (free KV blocks per running request)
    # below this means "add one".
    min_freeness: float = 1.0
    # Capacity model: a profile file (`disagg-serve profile`) and the TPOT target the decode
    # capacity is computed at (None: the profile's own default of 100 ms).
    profile: str | None = None
    slo_tpot_ms: float | None = None
    # Deadline for draining an instance on scale-in (live migration moves its requests).
    drain_timeout_s: float = 120.0
    # The profile's capacity model as a table, filled from `profile` by the CLI so the
    # scheduler needs no file: (role, prompt tokens, output tokens, prompt tokens/s per
    # instance, output tokens/s per instance at the TPOT target).
    capacity_table: tuple[tuple[str, float, float, float, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("interval_s", "window_s", "cooldown_s", "drain_timeout_s"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf") or (name != "cooldown_s" and value == 0):
                raise ValueError(f"autoscaler {name} must be a finite number"
                                 f"{' >= 0' if name == 'cooldown_s' else ' > 0'}, got {value}")
        if not 0 < self.scale_in_utilization < self.target_utilization <= 1.0:
            raise ValueError("autoscaler needs 0 < scale_in_utilization < target_utilization <= 1 "
                             f"(got {self.scale_in_utilization} and {self.target_utilization})")
        if self.scale_out_after < 1 or self.scale_in_after < 1:
            raise ValueError("autoscaler scale_out_after and scale_in_after must be >= 1")
        if self.max_waiting_per_instance < 0:
            raise ValueError("autoscaler max_waiting_per_instance must be >= 0")
        roles = [b.role for b in self.bounds]
        if len(roles) != len(set(roles)):
            raise ValueError(f"autoscaler bounds name a pool twice: {roles}")

    def bounds_for(self, role: str) -> PoolBounds | None:
        for b in self.bounds:
            if b.role == role:
                return b
        return None


@dataclass(frozen=True)
class ServeConfig:
    """Everything `disagg-serve up` needs."""

    engine: EngineConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    autoscaler: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    prefix_routing: PrefixRoutingConfig = field(default_factory=PrefixRoutingConfig)
    pools: tuple[PoolConfig, ...] = (PoolConfig(role="colocated", num_instances=1),)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
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
