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


# Live migration's transfer ids: the coordinator (router/migration.py) and the decode workers
# must agree on them, so they are part of the protocol.
def stage_transfer_id(migration_id: str, stage: int) -> str:
    """The source's hold of one pre-copy stage's blocks."""
    return f"{migration_id}#s{stage}"


def tail_transfer_id(migration_id: str) -> str:
    """The source's hold of the blocks left after the stop."""
    return f"{migration_id}#tail"
