"""One simulated vLLM engine: the V1 scheduler's decisions, without a model.

What it mirrors (vLLM 0.32 `v1/core/sched/scheduler.py`, chunked prefill on):

* a step has a token budget (`max_num_batched_tokens`) and at most `max_num_seqs` running
  sequences; running sequences are served first, in order (a decode takes one token, a
  prefill the rest of its prompt up to the budget), then waiting ones in arrival order;
* a sequence holds ceil(tokens computed / block size) KV blocks; when a running sequence
  needs a block and none is free, the *last* running sequence is preempted (its blocks freed,
  recomputed from scratch later) and no waiting sequence is admitted in that step;
* a waiting sequence whose blocks do not fit blocks the queue behind it (head-of-line);
* a sequence samples a token at the end of the step in which its last known token was
  computed;
* a decode-side sequence whose prompt KV comes from a prefill instance first waits, with its
  blocks allocated, for the transfer (`kv_pending`), then computes one token (the first
  output token's KV) and samples the second;
* a prefill-side sequence keeps its blocks after its one token until the transfer is done.

It only decides and counts; the simulator owns time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class SimSeq:
    """A request as one engine sees it (one attempt; a migration or hand-off makes a new one)."""

    request_id: str
    # Tokens known when the engine gets it (prompt, plus tokens generated elsewhere before).
    known_tokens: int
    # Tokens this engine still has to produce.
    max_new_tokens: int
    priority: int = 0
    arrival_s: float = 0.0
    computed: int = 0
    generated: int = 0
    blocks: int = 0
    # Decode side: the prompt's KV is being transferred in; not schedulable until it arrives.
    kv_pending: bool = False
    # Prefill side: finished, its blocks held for the decode side to pull.
    held: bool = False
    preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return self.known_tokens + self.generated

    @property
    def prefilling(self) -> bool:
        return self.computed < self.num_tokens - 1

    @property
    def done(self) -> bool:
        return self.generated >= self.max_new_tokens


@dataclass(frozen=True)
class StepPlan:
    """What one step computes: (sequence, new tokens) pairs and the cost-model features."""

    work: tuple[tuple[SimSeq, int], ...]
    prefill_tokens: int
    prefill_seqs: int
    prefill_attention: int
    decode_seqs: int
    decode_context: int
    # Sequences that sample a token at the end of the step (tokens streamed).
    samples: int = 0

    @property
    def empty(self) -> bool:
        return not self.work


@dataclass(frozen=True)
class EngineLoad:
    """The load report a real engine sends with every poll (cluster/protocol.py LoadReport)."""

    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    queued_prompt_tokens: int
    head_waiting_blocks: int


@dataclass
class SimEngine:
    num_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    running: list[SimSeq] = field(default_factory=list)
    waiting: deque = field(default_factory=deque)
    held: dict[str, SimSeq] = field(default_factory=dict)
    free_blocks: int = -1
    preemptions: int = 0

    def __post_init__(self) -> None:
        if self.free_blocks < 0:
            self.free_blocks = self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    # ---- requests in and out ----
    def add(self, seq: SimSeq) -> None:
        self.waiting.append(seq)

    def add_remote(self, seq: SimSeq) -> None:
        """A decode-side request whose first `known_tokens - 1` tokens' KV will be transferred.
        It queues; `admit_remote` gives it its blocks (vLLM allocates them before the load)."""
        seq.kv_pending = True
        self.waiting.append(seq)

    def admit_remote(self) -> list[SimSeq]:
        """Waiting remote-KV requests that now get their blocks (in queue order, stopping at the
        first that does not fit): the transfers to start."""
        started = []
        for seq in list(self.waiting):
            if not seq.kv_pending or seq.blocks:
                continue
            if len(self.running) + len(started) >= self.max_num_seqs:
                break
            need = self.blocks_for(seq.num_tokens)
            if need > self.free_blocks:
                break
            self.free_blocks -= need
            seq.blocks = need
            started.append(seq)
        return started

    def kv_arrived(self, seq: SimSeq) -> None:
        """The transfer finished: the prompt's KV is there; one token is left to compute."""
        seq.kv_pending = False
        seq.computed = seq.num_tokens - 1

    def remove(self, request_id: str) -> SimSeq | None:
        """Takes a request out (abort, migration away); frees its blocks."""
        for group in (self.running, self.waiting):
            for seq in group:
                if seq.request_id == request_id:
                    group.remove(seq)
                    self.free_blocks += seq.blocks
                    seq.blocks = 0
                    return seq
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.free_blocks += seq.blocks
            seq.blocks = 0
        return seq

    def release_hold(self, request_id: str) -> None:
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.free_blocks += seq.blocks
            seq.blocks = 0

    def adopt_running(self, seq: SimSeq) -> bool:
        """A migrated request arrives with its KV: runs at once if its blocks fit."""
        need = self.blocks_for(seq.computed + 1)
        if need > self.free_blocks or len(self.running) >= self.max_num_seqs:
            return False
        self.free_blocks -= need
        seq.blocks = need
        self.running.append(seq)
        return True

    # ---- the scheduler ----
    def _grow(self, seq: SimSeq, new_tokens: int) -> bool:
        need = self.blocks_for(seq.computed + new_tokens) - seq.blocks
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        seq.blocks += need
        return True

    def _preempt(self, seq: SimSeq) -> None:
        self.running.remove(seq)
        self.free_blocks += seq.blocks
        seq.blocks = 0
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        work: list[tuple[SimSeq, int]] = []
        preempted = False
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running:  # preempted below while making room for an earlier one
                continue
            n = min(seq.num_tokens - seq.computed, budget)
            if n <= 0:
                continue
            while not self._grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            work.append((seq, n))
            budget -= n
        if not preempted:
            for seq in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                if seq.kv_pending:
                    continue  # waits for its KV (its blocks are already allocated)
                n = min(seq.num_tokens - seq.computed, budget)
                if not self._grow(seq, n):
                    break  # head-of-line blocking
                self.waiting.remove(seq)
                self.running.append(seq)
                work.append((seq, n))
                budget -= n
        p_tokens = p_seqs = p_attn = d_seqs = d_ctx = samples = 0
        for seq, n in work:
            samples += seq.computed + n >= seq.num_tokens
            if n == 1 and seq.computed == seq.num_tokens - 1 and seq.computed > 0:
                d_seqs += 1
                d_ctx += seq.num_tokens
            else:
                p_tokens += n
                p_seqs += 1
                p_attn += n * (seq.computed + n)
        return StepPlan(tuple(work), p_tokens, p_seqs, p_attn, d_seqs, d_ctx, samples)

    def complete(self, plan: StepPlan) -> list[SimSeq]:
        """Applies a finished step; returns the sequences that sampled a token (a finished one
        has `done` set and has left the running list)."""
        sampled = []
        for seq, n in plan.work:
            seq.computed += n
            if seq.computed >= seq.num_tokens:
                seq.generated += 1
                sampled.append(seq)
                if seq.done:
                    self.running.remove(seq)
                    if seq.held:
                        self.held[seq.request_id] = seq
                    else:
                        self.free_blocks += seq.blocks
                        seq.blocks = 0
        return sampled

    # ---- views ----
    def has_work(self) -> bool:
        return bool(self.running) or any(not s.kv_pending for s in self.waiting)

    def load(self) -> EngineLoad:
        queued = sum(max(0, s.num_tokens - s.computed - 1) for s in self.running)
        queued += sum(s.num_tokens for s in self.waiting if not s.kv_pending)
        head = 0
        if self.waiting:
            head = self.blocks_for(self.waiting[0].num_tokens)
        return EngineLoad(self.num_blocks, self.free_blocks, len(self.running), len(self.waiting), queued, head)

    def sequences(self) -> list[SimSeq]:
        return list(self.running) + list(self.waiting)
