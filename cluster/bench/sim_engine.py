"""A simulated engine actor for front-end capacity studies: the worker surface the global
scheduler and the front ends use (info, add_request, abort, poll per owner, snapshot, ...), with
no model behind it. Every `step_s` it gives each live request one token (real vocabulary ids,
so the front end detokenizes real text) until the request's max_tokens, and queues the deltas
per owning front end exactly as the real engine loop does (cluster/engine/outbox.py). It
measures the front door, never an engine: benchmarks only.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from cluster.engine.loop import coalesce
from cluster.engine.outbox import Outbox
from cluster.protocol import (
    EngineRequest,
    EngineSnapshot,
    InstanceInfo,
    LiveRequest,
    LoadReport,
    StepBatch,
    TokenDelta,
)

SIM_BLOCKS = 1 << 20


@dataclass
class _Live:
    request: EngineRequest
    produced: int = 0


class SimEngineWorker:
    def __init__(self, instance_id: str, role: str, token_ids: list[int], step_s: float = 0.025,
                 model: str = "sim", orphan_timeout_s: float = 60.0):
        self.instance_id = instance_id
        self.role = role
        self.model = model
        self.token_ids = list(token_ids)
        self.step_s = step_s
        self.orphan_timeout_s = orphan_timeout_s
        self.outbox = Outbox()
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._steps = self._tokens = self._finished = 0
        self._thread = threading.Thread(target=self._run, name=f"sim-{instance_id}", daemon=True)
        self._thread.start()

    # ---- the worker surface ----
    def info(self) -> InstanceInfo:
        return InstanceInfo(self.instance_id, self.role, "sim-node", self.model, 1 << 20, 16, SIM_BLOCKS,
                            max(self.token_ids) + 1, (), None, pid=os.getpid())

    def describe(self) -> dict:
        return {"role": self.role, "instance_id": self.instance_id, "pid": os.getpid(), "engine": {},
                "transfer": {}, "spec": {}}

    def add_request(self, request: EngineRequest) -> None:
        self.outbox.touch(request.owner)
        with self._lock:
            self._live.setdefault(request.request_id, _Live(request))

    def abort(self, request_ids) -> None:
        routed = []
        with self._lock:
            for request_id in request_ids:
                live = self._live.pop(request_id, None)
                if live is not None:
                    routed.append((live.request.owner, TokenDelta(request_id, [], True, "abort")))
        self.outbox.put_many(routed)

    def fail_request(self, request_id: str, owner: str, reason: str) -> None:
        self.outbox.put(owner, [TokenDelta(request_id, [], True, "dead", error=reason)])

    def kv_release(self, transfer_id: str) -> bool:
        return False

    def poll(self, timeout_s: float, owner: str = "") -> StepBatch:
        return StepBatch(coalesce(self.outbox.take(owner, timeout_s)), self.load())

    def load(self) -> LoadReport:
        n = len(self._live)
        return LoadReport(self.instance_id, SIM_BLOCKS, SIM_BLOCKS - n, n, 0, 0, steps=self._steps,
                          tokens_generated=self._tokens, requests_finished=self._finished)

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            requests = tuple(LiveRequest(rid, live.request.owner, len(live.request.prompt_token_ids), live.produced,
                                         live.request.priority, live.request.arrival)
                             for rid, live in self._live.items())
        return EngineSnapshot(self.load(), requests, self.outbox.leases())

    def shutdown(self) -> None:
        self._stop.set()
        self.outbox.close()

    # ---- the "engine" ----
    def _run(self) -> None:
        next_step = time.monotonic()
        while not self._stop.is_set():
            next_step += self.step_s
            self._step()
            self._free_orphans()
            delay = next_step - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_step = time.monotonic()  # behind: do not try to catch up in a burst

    def _step(self) -> None:
        routed = []
        cycle = self.token_ids
        with self._lock:
            if not self._live:
                return
            self._steps += 1
            done = []
            for rid, live in self._live.items():
                token = cycle[(hash(rid) + live.produced) % len(cycle)]
                live.produced += 1
                finished = live.produced >= live.request.sampling.max_tokens
                routed.append((live.request.owner, TokenDelta(rid, [token], finished,
                                                              "length" if finished else None)))
                if finished:
                    done.append(rid)
            for rid in done:
                del self._live[rid]
            self._tokens += len(routed)
            self._finished += len(done)
        self.outbox.put_many(routed)

    def _free_orphans(self) -> None:
        silent = {owner for owner, seconds in self.outbox.leases().items() if seconds > self.orphan_timeout_s}
        if not silent:
            return
        with self._lock:
            for rid in [r for r, live in self._live.items() if live.request.owner in silent]:
                del self._live[rid]
        for owner in silent:
            self.outbox.drop(owner)
