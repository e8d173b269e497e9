"""EngineLoop: one vLLM engine driven by a step loop on its own thread.

The engine is not thread-safe, so only the loop thread touches it: callers enqueue commands
(add, abort) and collect per-step token deltas with `poll`, which blocks until output exists
or a timeout passes. One poll returns every delta produced since the previous poll for the
polling front end: deltas wait in per-front-end queues (cluster/engine/outbox.py), and a front
end that stops polling has its requests aborted and their KV freed (its orphan lease), while
other front ends' requests run on.

The loop also remembers what each live request is (its prompt, sampling, owner and the tokens
it produced here), so the global scheduler can read a snapshot of it and a live migration can
continue it elsewhere as "prompt + tokens so far" without asking the front end.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

from cluster.config import EngineConfig
from cluster.engine import vllm_adapter as va
from cluster.engine.outbox import Outbox
from cluster.engine.prefix_tracker import PrefixTracker
from cluster.protocol import EngineRequest, EngineSnapshot, LiveRequest, LoadReport, StepBatch, TokenDelta

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


@dataclass
class _Live:
    """What the loop keeps about a live request."""

    request: EngineRequest
    outputs: list[int] = field(default_factory=list)


# Ids the engine has run or been told to abort, remembered so that a late or repeated add of
# the same id (a migration's continuation after the front end gave up on it, a restarted
# scheduler completing a migration twice) is refused instead of running twice.
KNOWN_IDS = 65536


def coalesce(deltas: list[TokenDelta]) -> list[TokenDelta]:
    """One delta per request: the steps since the last poll, in order (fewer router wake-ups)."""
    merged: dict[str, TokenDelta] = {}
    for d in deltas:
        m = merged.get(d.request_id)
        if m is None:
            merged[d.request_id] = TokenDelta(d.request_id, list(d.token_ids), d.finished,
                                              d.finish_reason, d.stop_token_id, d.error,
                                              d.num_cached_tokens, d.migration_id, d.migrated_to,
                                              d.continued_as)
            continue
        m.token_ids.extend(d.token_ids)
        if d.finished:
            m.finished, m.finish_reason = True, d.finish_reason
            m.stop_token_id, m.error = d.stop_token_id, d.error
            m.migration_id, m.migrated_to, m.continued_as = d.migration_id, d.migrated_to, d.continued_as
    return list(merged.values())


class EngineLoop:
    def __init__(self, config: EngineConfig, instance_id: str, engine=None, kv_transfer=None, kv=None,
                 speculative: dict | None = None, clock=time.monotonic):
        """`clock`: what front ends' leases are measured with (a fake one in tests)."""
        self.config = config
        self.instance_id = instance_id
        # The KV connector's scheduler side (prefill/decode roles, cluster/kv/connector/scheduler.py)
        # must exist before vLLM builds its connector; it wakes the loop when it has work for a step.
        self.kv = kv
        self._wake = threading.Event()
        if kv is not None:
            kv.on_event = self._wake.set
        self.engine = engine if engine is not None else va.build_engine(config, kv_transfer, speculative)
        # Set by the worker when the engine speculates: a live stats object with snapshot().
        self.spec_stats = None
        # Prefix caching on: which prefixes the KV cache holds, from vLLM's KV cache events.
        self.prefix: PrefixTracker | None = None
        self._prefix_query_tokens = 0
        self._prefix_hit_tokens = 0
        # (vLLM may turn it off for a model it cannot cache, e.g. MLA on CPU: then nothing is reported.)
        if config.enable_prefix_caching and engine is None and va.prefix_caching_enabled(self.engine):
            self.prefix = PrefixTracker()
            va.install_kv_event_sink(self.engine, self.prefix.on_events)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Deltas per owning front end, and each front end's lease.
        self.outbox = Outbox(clock)
        self._live: set[str] = set()
        # What each live request is (loop thread writes; snapshot() copies).
        self._meta: dict[str, _Live] = {}
        # Ids seen: True once added, False when aborted before it was ever added.
        self._known: OrderedDict[str, bool] = OrderedDict()
        # External request id -> vLLM's internal id (it appends a suffix), for live requests.
        self._internal: dict[str, str] = {}
        # Called on the loop thread every iteration (reservation deadlines and the like).
        self.housekeeping: list = []
        # Called on the loop thread with a request the loop refused to add (its id already ran
        # or was aborted): whatever was set aside for it must be freed (a migration's blocks).
        self.on_refused = None
        # Requests driven from inside the actor (benchmarks): their deltas bypass poll().
        self._local_sinks: dict[str, queue.SimpleQueue] = {}
        self._stop = threading.Event()
        self._fatal: str | None = None
        self._steps = 0
        self._tokens = 0
        self._finished = 0
        self._prompt_tokens_computed = 0
        self.orphans_freed = 0
        self._awaiting_first: set[str] = set()
        self._load = self._measure_load()
        self._thread = threading.Thread(target=self._run, name=f"engine-{instance_id}", daemon=True)
        self._thread.start()

    # ---- caller side (any thread) ----
    def add(self, request: EngineRequest) -> None:
        self._check_alive()
        self.outbox.touch(request.owner)
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

    def end_request(self, request_id: str, finish_reason: str, **marker) -> None:
        """Loop thread: abort a live request in vLLM and end its stream with `finish_reason`
        (after every token it already produced, since deltas are emitted in order). `marker`:
        the migration fields of TokenDelta (where a migrated request continues)."""
        self.engine.abort_request([request_id])
        owner = self._owner(request_id)
        self._forget(request_id)
        self._finished += 1
        self._emit([TokenDelta(request_id, [], True, finish_reason, **marker)], [owner])

    def continuation(self, request_id: str, new_request_id: str) -> EngineRequest | None:
        """Loop thread: the live request as it would continue elsewhere under a new id: prompt
        + every token it produced, the sampling budget that remains, the same owner."""
        live = self._meta.get(request_id)
        if live is None:
            return None
        req, done = live.request, len(live.outputs)
        sampling = dataclasses.replace(req.sampling, max_tokens=req.sampling.max_tokens - done,
                                       min_tokens=max(0, req.sampling.min_tokens - done))
        return EngineRequest(new_request_id, tuple(req.prompt_token_ids) + tuple(live.outputs), sampling,
                             req.priority, owner=req.owner, arrival=req.arrival)

    def _owner(self, request_id: str) -> str:
        live = self._meta.get(request_id)
        return live.request.owner if live is not None else ""

    def _forget(self, request_id: str) -> None:
        self._live.discard(request_id)
        self._awaiting_first.discard(request_id)
        self._internal.pop(request_id, None)
        self._meta.pop(request_id, None)

    def poll(self, timeout_s: float, owner: str = "") -> StepBatch:
        """Every delta for `owner` since its last poll; waits up to timeout_s for the first one."""
        deltas = self.outbox.take(owner, timeout_s) if self._fatal is None else self.outbox.take(owner, 0)
        return StepBatch(deltas=coalesce(deltas), load=self._load, fatal_error=self._fatal)

    def snapshot(self, prefix_since: int | None = None) -> EngineSnapshot:
        """The load and every live request with its owner and progress (any thread); with
        prefix caching on, the changes to the cached prefixes after `prefix_since`."""
        meta = dict(self._meta)  # a copy taken under the GIL; the loop thread mutates the dict
        requests = tuple(
            LiveRequest(rid, live.request.owner, len(live.request.prompt_token_ids), len(live.outputs),
                        live.request.priority, live.request.arrival)
            for rid, live in meta.items())
        return EngineSnapshot(load=self._load, requests=requests, owners=self.outbox.leases(),
                              fatal_error=self._fatal,
                              prefix=self.prefix.read(prefix_since) if self.prefix is not None else None)

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
        self.outbox.close()

    def _check_alive(self) -> None:
        if self._fatal is not None:
            raise EngineStopped(f"engine {self.instance_id} failed: {self._fatal}")
        if self._stop.is_set():
            raise EngineStopped(f"engine {self.instance_id} is stopped")

    # ---- loop thread ----
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.kv is not None:
                    self.kv.expire_holds()
                self._drain_commands()
                for fn in self.housekeeping:
                    fn()
                self._free_orphans()
                if va.executor_failed(self.engine):  # a rank process died, even while idle
                    raise EngineStopped(f"a rank process of engine {self.instance_id} died")
                if va.has_work(self.engine):
                    produced = self._step()
                    if not produced and va.num_running(self.engine) == 0:
                        # Only requests waiting for KV (or hand-offs to settle): don't spin.
                        self._idle(0.005)
                else:
                    self._idle(0.1)
                self._load = self._measure_load()
        except Exception as exc:  # the engine is unusable: end every live request loudly
            log.exception("engine %s failed", self.instance_id)
            self._fatal = f"{type(exc).__name__}: {exc}"
            # A dead rank process is the instance dying (its requests replay elsewhere, as when
            # the actor dies); anything else is the engine failing them.
            reason = "dead" if isinstance(exc, EngineStopped) or va.executor_failed(self.engine) else "error"
            live = list(self._live)
            self._emit([TokenDelta(r, [], True, reason, error=self._fatal) for r in live],
                       [self._owner(r) for r in live])
            self._live.clear()
            self.outbox.close()
            traceback.print_exc()

    def _free_orphans(self) -> None:
        """A front end has not polled for a while (it died or hangs): nobody will read its
        requests' tokens, so free them rather than decode into the void. Other front ends'
        requests are untouched."""
        if not self._live:
            return
        now = self.outbox.clock()
        by_owner: dict[str, list[str]] = {}
        for r in self._live:
            if r not in self._local_sinks:
                by_owner.setdefault(self._owner(r), []).append(r)
        for owner, orphans in by_owner.items():
            if self.outbox.silent_for(owner, now) < self.config.orphan_timeout_s:
                continue
            log.warning("engine %s: front end %r did not poll for %.0fs, aborting its %d request(s)",
                        self.instance_id, owner, self.config.orphan_timeout_s, len(orphans))
            self.engine.abort_request(orphans)
            for r in orphans:
                self._forget(r)
            self.orphans_freed += len(orphans)
            self.outbox.drop(owner)

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
        known = self._known.get(request.request_id)
        if known is not None:
            if not known:  # aborted before it arrived: it must not start after all
                self._emit([TokenDelta(request.request_id, [], True, "abort")], [request.owner])
            if self.on_refused is not None:
                self.on_refused(request)
            return  # an id runs once: a repeated add (a retried continuation) changes nothing
        self._remember(request.request_id, True)
        try:
            internal = self.engine.add_request(
                request.request_id,
                {"prompt_token_ids": list(request.prompt_token_ids)},
                va.to_sampling_params(request.sampling, request.kv_transfer),
                priority=-request.priority,  # vLLM serves lower values first
            )
        except Exception as exc:  # noqa: BLE001 - whatever vLLM rejects one request with must not stop the engine
            self._emit([TokenDelta(request.request_id, [], True, "error", error=str(exc))], [request.owner])
            return
        self._live.add(request.request_id)
        self._meta[request.request_id] = _Live(request)
        self._internal[request.request_id] = internal
        self._awaiting_first.add(request.request_id)

    def _remember(self, request_id: str, added: bool) -> None:
        self._known[request_id] = added
        self._known.move_to_end(request_id)
        while len(self._known) > KNOWN_IDS:
            self._known.popitem(last=False)

    def _abort(self, request_ids) -> None:
        for r in request_ids:
            if r not in self._known:
                self._remember(r, False)  # not here yet: refuse it if it comes
        live = [r for r in request_ids if r in self._live]
        if not live:
            return
        self.engine.abort_request(live)
        owners = [self._owner(r) for r in live]
        for r in live:
            self._forget(r)
        self._finished += len(live)
        self._emit([TokenDelta(r, [], True, "abort") for r in live], owners)

    def fail(self, request_id: str, owner: str, reason: str) -> None:
        """Loop thread: tells `owner` that `request_id` will not run here (a continuation that
        could not start): its stream replays the request. Refuses the id from now on."""
        if request_id in self._live:
            return
        if request_id not in self._known:
            self._remember(request_id, False)
        self._emit([TokenDelta(request_id, [], True, "dead", error=reason)], [owner])

    def _step(self) -> int:
        outputs = self.engine.step()
        self._steps += 1
        deltas, owners = [], []
        for out in outputs:
            if out.request_id not in self._live:
                continue
            completion = out.outputs[0]
            new_ids = list(completion.token_ids)
            self._tokens += len(new_ids)
            live = self._meta.get(out.request_id)
            if live is not None:
                live.outputs.extend(new_ids)
                owners.append(live.request.owner)
            else:
                owners.append("")
            delta = TokenDelta(out.request_id, new_ids)
            if out.request_id in self._awaiting_first and new_ids:
                self._awaiting_first.discard(out.request_id)
                delta.num_cached_tokens = out.num_cached_tokens or 0
                self._prompt_tokens_computed += len(out.prompt_token_ids or ()) - delta.num_cached_tokens
                if self.prefix is not None:  # with prefix caching off, cached tokens are transferred ones
                    self._prefix_query_tokens += len(out.prompt_token_ids or ())
                    self._prefix_hit_tokens += delta.num_cached_tokens
            if out.finished:
                delta.finished = True
                delta.finish_reason = completion.finish_reason or "stop"
                if isinstance(completion.stop_reason, int):
                    delta.stop_token_id = completion.stop_reason
                self._forget(out.request_id)
                self._finished += 1
            deltas.append(delta)
        if deltas:
            self._emit(deltas, owners)
        return len(deltas)

    def _emit(self, deltas: list[TokenDelta], owners: list[str]) -> None:
        """Each delta to its request's owner (the front end that polls for it)."""
        routed = []
        for d, owner in zip(deltas, owners, strict=True):
            sink = self._local_sinks.get(d.request_id)
            if sink is not None:
                sink.put(d)
            else:
                routed.append((owner, d))
        self.outbox.put_many(routed)

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
            kv=self.kv.stats_snapshot() if self.kv is not None else {},
            spec=self.spec_stats.snapshot() if self.spec_stats is not None else {},
            prefix=self._prefix_stats(),
        )

    def _prefix_stats(self) -> dict:
        if self.prefix is None:
            return {}
        # One tier today: the engine's own KV cache ("device"); see README, prefix reuse.
        return {"query_tokens": self._prefix_query_tokens, "hit_tokens_device": self._prefix_hit_tokens,
                "cached_blocks": self.prefix.num_blocks, "orphan_blocks": self.prefix.orphan_blocks}
