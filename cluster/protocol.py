"""Dataclasses exchanged between the router and the worker actors.

Workers emit token ids only; the router owns detokenization and stop strings, so a request's
text stays continuous whichever engines computed its tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    """Engine-side sampling parameters, already validated by the router."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    priority: int = 0
    # Connector parameters (cluster/kv/connector.py), e.g. {"do_remote_decode": True, ...}.
    kv_transfer: dict | None = None
    # The front end whose stream this request feeds: the engine queues its deltas for that
    # front end's polls only (a migrated or replayed request keeps it). "" is the default
    # consumer (benchmarks and tools that poll without a name).
    owner: str = ""
    # Wall-clock time the request reached its front end (migration's "last arrived" policy).
    arrival: float = 0.0


@dataclass
class TokenDelta:
    """New tokens of one request since the previous delta, in one engine step."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    # length | stop | abort | error
    finish_reason: str | None = None
    # The stop token id that ended the request, if any.
    stop_token_id: int | None = None
    error: str | None = None
    # Prompt tokens this engine did not compute (prefix cache or transferred KV); first delta only.
    num_cached_tokens: int | None = None
    # On the "migrated" marker (finish_reason "migrated"): the migration, the instance the
    # request continues on and its engine-side id there. The front end switches the stream to
    # that id; deltas of it that arrive first wait for this marker.
    migration_id: str | None = None
    migrated_to: str | None = None
    continued_as: str | None = None


@dataclass(frozen=True)
class LoadReport:
    instance_id: str
    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    queued_prompt_tokens: int
    # Blocks the head-of-line waiting request needs (Llumnix de-fragmentation signal).
    head_waiting_blocks: int = 0
    steps: int = 0
    tokens_generated: int = 0
    requests_finished: int = 0
    # Prompt tokens this engine computed itself (not transferred or cached), cumulative.
    prompt_tokens_computed: int = 0
    # KV transfer counters (cumulative) of this instance's agent, if it has one.
    kv: dict = field(default_factory=dict)
    # Speculative decoding counters (cumulative), if the engine speculates.
    spec: dict = field(default_factory=dict)
    # Prefix caching (engines with it on): {"query_tokens": prompt tokens looked up,
    # "hit_tokens_device": of them found in the engine's KV cache, "cached_blocks": prefixes
    # held now} (cumulative but the last); empty with prefix caching off.
    prefix: dict = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    @property
    def kv_usage(self) -> float:
        if self.num_total_blocks <= 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


@dataclass(frozen=True)
class StepBatch:
    """What one poll of a worker returns: the deltas of every step since the last poll."""

    deltas: list[TokenDelta]
    load: LoadReport
    # Set when the engine failed; the instance is then unusable.
    fatal_error: str | None = None


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    role: str
    node_id: str
    model: str
    max_model_len: int
    block_size: int
    num_total_blocks: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pid: int = 0
    # Tensor parallelism: ranks of the engine and their processes (rank 0 first; one entry, the
    # actor's own pid, without TP).
    tensor_parallel_size: int = 1
    rank_pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class LiveRequest:
    """One request an engine runs now, as the global scheduler sees it (engine snapshots)."""

    request_id: str  # engine-side id: "<client id>@<attempt>[~<migration>...]"
    owner: str
    num_prompt_tokens: int  # what the engine got as its prompt (a continuation's includes outputs)
    num_output_tokens: int
    priority: int = 0
    arrival: float = 0.0  # wall-clock arrival at the front end


@dataclass(frozen=True)
class EngineSnapshot:
    """What the global scheduler reads from one engine: its load, the requests it runs, the
    front ends it serves and the live-migration state it holds (a restarted scheduler rebuilds
    its whole view from these)."""

    load: LoadReport
    requests: tuple[LiveRequest, ...] = ()
    # Front-end id -> seconds since it last polled (its orphan lease).
    owners: dict = field(default_factory=dict)
    # Live migration (decode instances): {"incoming": [migration ids reserved here, not yet
    # committed], "outgoing": [migration ids with stage views here], "stopped": {migration id:
    # {"request": EngineRequest, "target": instance id}}: requests stopped here for a
    # migration whose commit was not confirmed}.
    migrations: dict = field(default_factory=dict)
    fatal_error: str | None = None
    # Prefix caching: the changes to the prefixes this engine holds since the position the
    # reader passed (cluster/engine/prefix_tracker.py), or None with prefix caching off.
    prefix: dict | None = None


def client_request_id(engine_request_id: str) -> str:
    """The client's (front end's) request id in an engine-side id."""
    return engine_request_id.rpartition("@")[0] or engine_request_id


# Live migration's transfer ids: the coordinator (router/migration.py) and the decode workers
# must agree on them, so they are part of the protocol.
def stage_transfer_id(migration_id: str, stage: int) -> str:
    """The source's hold of one pre-copy stage's blocks."""
    return f"{migration_id}#s{stage}"


def tail_transfer_id(migration_id: str) -> str:
    """The source's hold of the blocks left after the stop."""
    return f"{migration_id}#tail"


def push_reservation_id(transfer_id: str) -> str:
    """A decode engine's reservation for a prompt's KV pushed layer by layer (Splitwise)."""
    return f"push:{transfer_id}"
