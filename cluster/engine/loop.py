"""EngineLoop: one vLLM engine driven by a step loop on its own thread.

The engine is not thread-safe, so only the loop thread touches it: callers enqueue commands
(add, abort) and collect per-step token deltas with `poll`, which blocks until output exists
or a timeout passes. One poll returns every delta produced since the previous poll.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass

from cluster.config import EngineConfig
from cluster.engine import vllm_adapter as va
from cluster.protocol import EngineRequest, LoadReport, StepBatch, TokenDelta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request: EngineRequest


@dataclass(frozen=True)
class _Abort:
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class _Call:
    """Runs fn(loop) on the loop thread between steps (engine internals are not thread-safe)."""

    fn: object
    future: Future


class EngineStopped(RuntimeError):
    pass


def coalesce(deltas: list[TokenDelta]) -> list[TokenDelta]:
    """One delta per request: the steps since the last poll, in order (fewer router wake-ups)."""
    merged: dict[str, TokenDelta] = {}
    for d in deltas:
        m = merged.get(d.request_id)
        if m is None:
            merged[d.request_id] = TokenDelta(d.request_id, list(d.token_ids), d.finished,
                                              d.finish_reason, d.stop_token_id, d.error)
            continue
        m.token_ids.extend(d.token_ids)
        if d.finished:
            m.finished, m.finish_reason = True, d.finish_reason
            m.stop_token_id, m.error = d.stop_token_id, d.error
    return list(merged.values())


class EngineLoop:
    def __init__(self, config: EngineConfig, instance_id: str, engine=None, kv_transfer=None, agent=None,
                 speculative: dict | None = None):
        self.config = config
        self.instance_id = instance_id
        # The KV agent (prefill/decode roles) must exist before vLLM builds its connector.
        self.agent = agent
        self._wake = threading.Event()
        if agent is not None:
            agent.on_event = self._wake.set
        self.engine = engine if engine is not None else va.build_engine(config, kv_transfer, speculative)
        # Set by the worker when the engine speculates: a live stats object with snapshot().
        self.spec_stats = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: list[TokenDelta] = []
        self._cond = threading.Condition()
        self._live: set[str] = set()
        # External request id -> vLLM's internal id (it appends a suffix), for live requests.
        self._internal: dict[str, str] = {}
        # Called on the loop thread every iteration (reservation deadlines and the like).
        self.housekeeping: list = []
        # Requests driven from inside the actor (benchmarks): their deltas bypass poll().
        self._local_sinks: dict[str, queue.SimpleQueue] = {}
        self._stop = threading.Event()
        self._fatal: str | None = None
        self._steps = 0
        self._tokens = 0
        self._finished = 0
        self._prompt_tokens_computed = 0
        self._last_poll = time.monotonic()
        self.orphans_freed = 0
        self._awaiting_first: set[str] = set()
        self._load = self._measure_load()
        self._thread = threading.Thread(target=self._run, name=f"engine-{instance_id}", daemon=True)
        self._thread.start()

    # ---- caller side (any thread) ----
    def add(self, request: EngineRequest) -> None:
        self._check_alive()
        self._commands.put(_Add(request))
        self._wake.set()

    def abort(self, request_ids) -> None:
        self._commands.put(_Abort(tuple(request_ids)))
        self._wake.set()

    def call(self, fn, timeout_s: float):
        """fn(loop) on the loop thread, between engine steps; its result or exception."""
        self._check_alive()
        future: Future = Future()
        self._commands.put(_Call(fn, future))
        self._wake.set()
        return future.result(timeout=timeout_s)

    def internal_id(self, request_id: str) -> str | None:
        """vLLM's id for a live request (loop thread)."""
        return self._internal.get(request_id) if request_id in self._live else None

    def end_request(self, request_id: str, finish_reason: str) -> None:
        """Loop thread: abort a live request in vLLM and end its stream with `finish_reason`
        (after every token it already produced, since deltas are emitted in order)."""
        self.engine.abort_request([request_id])
        self._forget(request_id)
        self._finished += 1
        self._emit([TokenDelta(request_id, [], True, finish_reason)])

    def _forget(self, request_id: str) -> None:
        self._live.discard(request_id)
        self._awaiting_first.discard(request_id)
        self._internal.pop(request_id, None)

    def poll(self, timeout_s: float) -> StepBatch:
        """Every delta since the last poll; waits up to timeout_s for the first one."""
        deadline = time.monotonic() + timeout_s
        self._last_poll = time.monotonic()
        with self._cond:
            while not self._outputs and self._fatal is None and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            deltas, self._outputs = self._outputs, []
            return StepBatch(deltas=coalesce(deltas), load=self._load, fatal_error=self._fatal)

    def load(self) -> LoadReport:
        return self._load

    def run_local(self, requests: list[EngineRequest], timeout_s: float) -> dict:
        """Runs requests to completion without the router (the in-process baseline of the
        gRPC-overhead benchmark). Returns output tokens and wall seconds."""
        sink: queue.SimpleQueue = queue.SimpleQueue()
        for r in requests:
            self._local_sinks[r.request_id] = sink
        start = time.perf_counter()
        for r in requests:
            self.add(r)
        deadline = time.monotonic() + timeout_s
        tokens, open_ids = 0, {r.request_id for r in requests}
        try:
            while open_ids:
                delta = sink.get(timeout=max(0.0, deadline - time.monotonic()))
                tokens += len(delta.token_ids)
                if delta.finished:
                    open_ids.discard(delta.request_id)
        except queue.Empty:
            self.abort(open_ids)
            raise TimeoutError(f"{len(open_ids)} local requests unfinished after {timeout_s}s") from None
        finally:
            for r in requests:
                self._local_sinks.pop(r.request_id, None)
        return {"output_tokens": tokens, "seconds": time.perf_counter() - start}

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        with self._cond:
            self._cond.notify_all()

    def _check_alive(self) -> None:
        if self._fatal is not None:
            raise EngineStopped(f"engine {self.instance_id} failed: {self._fatal}")
        if self._stop.is_set():
            raise EngineStopped(f"engine {self.instance_id} is stopped")

    # ---- loop thread ----
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.agent is not None:
                    self.agent.expire_holds()
                self._drain_commands()
                for fn in self.housekeeping:
                    fn()
                self._free_orphans()
                if va.has_work(self.engine):
                    produced = self._step()
                    if not produced and va.num_running(self.engine) == 0:
                        # Only requests waiting for KV (or hand-offs to settle): don't spin.
                        self._idle(0.005)
                else:
                    self._idle(0.1)
                self._load = self._measure_load()
        except Exception as exc:  # the engine is unusable: fail every live request loudly
            log.exception("engine %s failed", self.instance_id)
            self._fatal = f"{type(exc).__name__}: {exc}"
            self._emit([TokenDelta(r, [], True, "error", error=self._fatal) for r in self._live])
            self._live.clear()
            traceback.print_exc()

    def _free_orphans(self) -> None:
        """Nobody has polled for a while (the router died or hangs): nobody will read these
        requests' tokens, so free them rather than decode into the void."""
        if not self._live or time.monotonic() - self._last_poll < self.config.orphan_timeout_s:
            return
        orphans = [r for r in self._live if r not in self._local_sinks]
        if not orphans:
            return
        log.warning("engine %s: no poll for %.0fs, aborting %d orphaned request(s)", self.instance_id,
                    self.config.orphan_timeout_s, len(orphans))
        self.engine.abort_request(orphans)
        for r in orphans:
            self._forget(r)
        self.orphans_freed += len(orphans)
        with self._cond:
            self._outputs.clear()

    def _idle(self, timeout_s: float) -> None:
        self._wake.wait(timeout_s)
        self._wake.clear()

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._add(cmd.request)
            elif isinstance(cmd, _Abort):
                self._abort(cmd.request_ids)
            elif isinstance(cmd, _Call):
                if cmd.future.set_running_or_notify_cancel():
                    try:
                        cmd.future.set_result(cmd.fn(self))
                    except Exception as exc:  # noqa: BLE001 - the caller gets whatever it was; the loop goes on
                        cmd.future.set_exception(exc)

    def _add(self, request: EngineRequest) -> None:
        try:
            internal = self.engine.add_request(
                request.request_id,
                {"prompt_token_ids": list(request.prompt_token_ids)},
                va.to_sampling_params(request.sampling, request.kv_transfer),
                priority=-request.priority,  # vLLM serves lower values first
            )
        except Exception as exc:  # noqa: BLE001 - whatever vLLM rejects one request with must not stop the engine
            self._emit([TokenDelta(request.request_id, [], True, "error", error=str(exc))])
            return
        self._live.add(request.request_id)
        self._internal[request.request_id] = internal
        self._awaiting_first.add(request.request_id)

    def _abort(self, request_ids) -> None:
        live = [r for r in request_ids if r in self._live]
        if not live:
            return
        self.engine.abort_request(live)
        for r in live:
            self._forget(r)
        self._finished += len(live)
        self._emit([TokenDelta(r, [], True, "abort") for r in live])

    def _step(self) -> int:
        outputs = self.engine.step()
        self._steps += 1
        deltas = []
        for out in outputs:
            if out.request_id not in self._live:
                continue
            completion = out.outputs[0]
            new_ids = list(completion.token_ids)
            self._tokens += len(new_ids)
            delta = TokenDelta(out.request_id, new_ids)
            if out.request_id in self._awaiting_first and new_ids:
                self._awaiting_first.discard(out.request_id)
                delta.num_cached_tokens = out.num_cached_tokens or 0
                self._prompt_tokens_computed += len(out.prompt_token_ids or ()) - delta.num_cached_tokens
            if out.finished:
                delta.finished = True
                delta.finish_reason = completion.finish_reason or "stop"
                if isinstance(completion.stop_reason, int):
                    delta.stop_token_id = completion.stop_reason
                self._forget(out.request_id)
                self._finished += 1
            deltas.append(delta)
        if deltas:
            self._emit(deltas)
        return len(deltas)

    def _emit(self, deltas: list[TokenDelta]) -> None:
        routed = []
        for d in deltas:
            sink = self._local_sinks.get(d.request_id)
            if sink is not None:
                sink.put(d)
            else:
                routed.append(d)
        if routed:
            with self._cond:
                self._outputs.extend(routed)
                self._cond.notify_all()

    def _measure_load(self) -> LoadReport:
        running, waiting, queued, head_blocks = va.queue_snapshot(self.engine)
        return LoadReport(
            instance_id=self.instance_id,
            num_total_blocks=va.num_usable_blocks(self.engine),
            num_free_blocks=va.num_free_blocks(self.engine),
            num_running=running,
            num_waiting=waiting,
            queued_prompt_tokens=queued,
            head_waiting_blocks=head_blocks,
            steps=self._steps,
            tokens_generated=self._tokens,
            requests_finished=self._finished,
            prompt_tokens_computed=self._prompt_tokens_computed,
            kv=self.agent.stats_snapshot() if self.agent is not None else {},
            spec=self.spec_stats.snapshot() if self.spec_stats is not None else {},
        )
