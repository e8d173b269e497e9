"""Router core: places requests on instances, pumps per-step token batches back from every
instance, and turns them into one client stream per request (text, stop strings, usage).

Colocated mode: one engine serves a request from prompt to finish. Disaggregated mode: a
prefill instance computes the prompt and the first token; the router then hands the request
(prompt + first token) to a decode instance, which pulls the prompt's KV from the prefill
instance and decodes the rest. The client sees one stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
import ray

from cluster.config import MigrationConfig, RouterConfig
from cluster.kv.layout import blocks_for_tokens
from cluster.protocol import EngineRequest, TokenDelta
from router.detokenizer import IncrementalDetokenizer, StopStringMatcher
from router.dispatcher import Candidate, fewest_queued_prompt_tokens, freest, least_loaded
from router.errors import RequestError
from router.freeness import (
    InstanceView,
    RequestView,
    available_blocks,
    is_high_priority,
    pair_migrations,
    pick_dispatch,
    select_request,
)
from router.instances import Instance, InstanceState
from router.metrics import RouterMetrics
from router.migration import MODES, MigrationCoordinator
from router.migration_types import DrainResult, MigrationRecord, MigrationState, MigrationStats
from router.request_table import RequestState, RequestTable
from router.validation import ValidatedRequest

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # length | stop | abort
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    served_by: tuple[str, ...] = ()


class _InstanceFailed(Exception):
    """An instance failed while taking a request; the request is placed again elsewhere."""


class Router:
    def __init__(self, config: RouterConfig, instances: list[Instance], tokenizer,
                 metrics: RouterMetrics | None = None, respawn=None, migration: MigrationConfig | None = None):
        self.config = config
        self.instances = {i.instance_id: i for i in instances}
        self.tokenizer = tokenizer
        self.metrics = metrics or RouterMetrics()
        self.table = RequestTable()
        self.requests_total = 0
        self.started_at = time.time()
        self._pumps: list[asyncio.Task] = []
        self._stopping = False
        roles = {i.role for i in instances}
        self.disaggregated = {"prefill", "decode"} <= roles
        # respawn(info) -> a fresh actor for a dead instance (from the launcher); None: no respawn.
        self._respawn_fn = respawn if config.respawn_dead else None
        self._tasks: set[asyncio.Task] = set()
        self.migration_config = migration or MigrationConfig()
        self.freeness = self.migration_config.freeness()
        self.migrator = MigrationCoordinator(self, self.migration_config)
        self.migration_stats = MigrationStats()
        self._migrations: dict[str, MigrationRecord] = {}  # in flight, by migration id
        self._migration_seq = 0
        self._resumed: dict[str, asyncio.Event] = {}  # migration id -> set once it is counted

    # ---- lifecycle ----
    def start(self) -> None:
        self.metrics.watch(self)
        for inst in self.instances.values():
            self._start_pump(inst)
        decode = [i for i in self.instances.values() if i.role == "decode"]
        if self.migration_config.enabled and len(decode) >= 2:
            self._spawn(self._balance_loop())

    def _start_pump(self, inst: Instance) -> None:
        self._pumps.append(asyncio.create_task(self._pump(inst), name=f"pump-{inst.instance_id}"))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._pumps + list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._pumps, *self._tasks, return_exceptions=True)

    def actors(self) -> list:
        return [i.actor for i in self.instances.values()]

    def ready(self, role: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.ready and i.role == role]

    # ---- requests ----
    async def generate(self, request: ValidatedRequest):
        """Async iterator of Chunks; the last one has finished=True. Raises RequestError."""
        if len(self.table) >= self.config.max_in_flight:
            self.metrics.rejected.inc()
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {len(self.table)} requests in flight (limit {self.config.max_in_flight}); "
                "retry later", retry_after_ms=self._retry_hint_ms())
        request_id = request.client_request_id or uuid.uuid4().hex
        state = RequestState(request_id, request)
        self.table.add(state)
        self.requests_total += 1
        self.metrics.in_flight.inc()
        self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
        status, finish_reason = "OK", "none"
        try:
            await self._place_resilient(state)
            async for chunk in self._stream(state):
                if chunk.finished:
                    finish_reason = chunk.finish_reason
                yield chunk
        except RequestError as exc:
            status = exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        finally:
            self._release(state)
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(finish_reason, status).inc()

    def _retry_hint_ms(self) -> int:
        """Roughly how long until a slot frees: the mean request time seen so far, bounded."""
        count, total = self.metrics.e2e_count_sum()
        mean_s = total / count if count else 1.0
        return int(min(30.0, max(0.1, mean_s)) * 1000)

    async def abort(self, request_id: str) -> None:
        state = self.table.get(request_id)
        if state is None or state.finished:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no in-flight request with id {request_id!r}")
        state.abort_requested = True
        # End the stream here, whatever phase the request is in; the engine side follows.
        state.deltas.put_nowait(TokenDelta(state.engine_request_id or request_id, [], True, "abort"))
        inst = self.instances.get(state.instance_id) if state.instance_id else None
        if inst is not None and inst.serving:
            await self.call_actor(inst.actor.abort.remote([state.engine_request_id]))

    def remaining(self, state: RequestState):
        """What is left of a request: prompt + tokens streamed so far, and the sampling budget
        that remains. A first placement, a hand-off and a replay all start from this."""
        req = state.request
        done = len(state.output_token_ids)
        sampling = dataclasses.replace(req.sampling, max_tokens=req.sampling.max_tokens - done,
                                       min_tokens=max(0, req.sampling.min_tokens - done))
        return req.prompt_token_ids + tuple(state.output_token_ids), sampling

    def next_attempt(self, state: RequestState) -> str:
        """Engine-side ids are unique per attempt, so a replay never collides with leftovers."""
        state.attempt += 1
        state.engine_request_id = f"{state.request_id}@{state.attempt}"
        return state.engine_request_id

    async def _place(self, state: RequestState) -> None:
        prompt, sampling = self.remaining(state)
        if self.disaggregated and sampling.max_tokens > 1:
            await self._place_prefill(state, prompt, sampling)
            return
        role = "prefill" if self.disaggregated else "colocated"
        inst = await self._pick(role, least_loaded)
        state.phase = "single"
        engine_request = EngineRequest(self.next_attempt(state), prompt, sampling, state.request.priority)
        await self._add(inst, state, inst.actor.add_request.remote(engine_request))

    async def _place_prefill(self, state: RequestState, prompt, sampling) -> None:
        inst = await self._pick("prefill", fewest_queued_prompt_tokens)
        engine_id = self.next_attempt(state)
        one_token = dataclasses.replace(sampling, max_tokens=1, min_tokens=min(1, sampling.min_tokens))
        engine_request = EngineRequest(engine_id, prompt, one_token, state.request.priority,
                                       kv_transfer={"do_remote_decode": True, "transfer_id": engine_id})
        state.phase = "prefill"
        state.prefill_instance_id = inst.instance_id
        state.prefill_engine_id = engine_id
        state.prefill_tokens = len(prompt)
        inst.queued_prompt_tokens += len(prompt)
        try:
            await self._add(inst, state, inst.actor.add_request.remote(engine_request))
        except RequestError:
            inst.queued_prompt_tokens -= len(prompt)
            raise

    async def _handoff(self, state: RequestState) -> None:
        """Prefill done: move the request (prompt + tokens so far) to a decode instance."""
        source = self.instances[state.prefill_instance_id]
        prompt, sampling = self.remaining(state)
        target = await self._pick_decode(len(prompt) + 1, state.request.priority)
        transfer_id = state.prefill_engine_id
        engine_request = EngineRequest(transfer_id, prompt, sampling, state.request.priority,
                                       kv_transfer={"do_remote_prefill": True, "transfer_id": transfer_id})
        self._leave(source, state)
        state.phase = "decode"
        state.handoff_at = time.monotonic()
        ref = target.actor.add_transferred.remote(engine_request, source.instance_id, source.actor,
                                                  state.prefill_tokens, source.info.node_id)
        await self._add(target, state, ref)

    async def _place_resilient(self, state: RequestState, failure: str | None = None) -> None:
        """Places the request (or, after `failure`, replays it), moving on past instances that
        fail while taking it, within the request's replay budget."""
        while True:
            try:
                if failure is None:
                    await self._place(state)
                else:
                    await self._replay(state, failure)
                return
            except _InstanceFailed as exc:
                failure = str(exc)

    async def _replay(self, state: RequestState, reason: str) -> None:
        """The instance serving the request died: run what is left of it elsewhere."""
        state.replays += 1
        if state.replays > self.config.max_replays:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"request failed after {self.config.max_replays} replay(s); last error: {reason}")
        log.warning("replaying request %s (%d tokens streamed) after: %s", state.request_id,
                    len(state.output_token_ids), reason)
        self.metrics.replays.inc()
        inst = self.instances.get(state.instance_id) if state.instance_id else None
        if inst is not None and state.request_id in inst.in_flight:
            self._leave(inst, state)
        self._release_prefill_hold(state)
        await self._place(state)

    async def _pick_decode(self, num_tokens: int, priority: int) -> Instance:
        """Llumnix freeness: the decode instance with the most free blocks per running request
        after virtual usage (head-of-line waiting request, high-priority headroom, draining)."""
        ready = self.ready("decode")
        if ready and all(i.load is not None for i in ready):
            views = [self._decode_view(i) for i in ready]
            chosen = pick_dispatch(views, self.freeness, blocks_for_tokens(num_tokens, ready[0].info.block_size),
                                   priority)
            if chosen is not None:
                return self.instances[chosen]
        # Nothing fits right now (or no load seen yet): the freest by plain free blocks; the
        # engine queues the request until blocks free up.
        return await self._pick("decode", freest)

    async def _pick(self, role: str, policy) -> Instance:
        """The policy's choice among ready instances; while every instance of the role is being
        replaced, waits (bounded) for one to come back rather than failing at once."""
        deadline = time.monotonic() + self.config.instance_wait_s
        while True:
            candidates = [Candidate(i.instance_id, len(i.in_flight), i.load.num_free_blocks if i.load else 0,
                                    i.queued_prompt_tokens) for i in self.ready(role)]
            chosen = policy(candidates)
            if chosen is not None:
                return self.instances[chosen]
            coming = any(i.role == role and i.state == InstanceState.STARTING or
                         (i.role == role and i.state == InstanceState.DEAD and self._respawn_fn is not None)
                         for i in self.instances.values())
            if not coming or time.monotonic() > deadline:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no {role} instance is available")
            await asyncio.sleep(0.1)

    async def _add(self, inst: Instance, state: RequestState, ref) -> None:
        state.instance_id = inst.instance_id
        inst.in_flight.add(state.request_id)
        try:
            await self.call_actor(ref)
        except Exception as exc:
            inst.in_flight.discard(state.request_id)
            reason = f"instance {inst.instance_id} did not accept the request: {type(exc).__name__}: {exc}"
            self._mark_dead(inst, reason)
            raise _InstanceFailed(reason) from exc
        state.served_by.append(inst.instance_id)

    def _leave(self, inst: Instance, state: RequestState) -> None:
        inst.in_flight.discard(state.request_id)
        inst.requests_served += 1
        if state.phase == "prefill":
            inst.queued_prompt_tokens -= state.prefill_tokens

    async def _stream(self, state: RequestState):
        req = state.request
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
        stops = StopStringMatcher(req.stop_strings)
        while True:
            delta: TokenDelta = await state.deltas.get()
            if delta.finish_reason == "error":
                raise RequestError(grpc.StatusCode.INTERNAL,
                                   f"instance {state.instance_id} failed the request: {delta.error}")
            if delta.finish_reason == "dead":
                if delta.request_id != state.engine_request_id:
                    continue  # a stale report about an attempt already replaced
                await self._place_resilient(state, delta.error or "instance died")
                continue
            # Stopped for a migration: the tokens of its last steps (coalesced into this delta)
            # still go to the client; then the coordinator resumes it on the destination.
            migrated = delta.finish_reason == "migrated"
            self._observe_tokens(state, delta.token_ids, time.monotonic())
            # A prefill that ran to its one-token limit is not the end of the request.
            hand_off = (state.phase == "prefill" and delta.finished and delta.finish_reason == "length")
            final = delta.finished and not hand_off and not migrated
            text = detok.push(delta.token_ids)
            if final:
                text += detok.flush()
            match = stops.feed(text, final=final)
            chunk = Chunk(state.request_id, list(delta.token_ids), match.text)
            if match.stopped_on is not None:
                # The engine would keep generating past a stop string it never saw.
                self._abort_quietly(state)
                self._finish(chunk, state, "stop", match.stopped_on)
            elif final:
                stop_reason = str(delta.stop_token_id) if delta.stop_token_id is not None else ""
                self._finish(chunk, state, delta.finish_reason, stop_reason)
            if chunk.token_ids or chunk.text or chunk.finished:
                yield chunk
            if chunk.finished:
                return
            if migrated:
                if state.migration is not None and delta.request_id == state.engine_request_id:
                    state.migration_stopped.set()  # the coordinator commits on the destination
                else:  # stopped with nobody to resume it (a lost reply): replay
                    await self._place_resilient(state, "stopped for a migration that is gone")
            if hand_off:
                try:
                    await self._handoff(state)
                except _InstanceFailed as exc:
                    await self._place_resilient(state, str(exc))

    def _finish(self, chunk: Chunk, state: RequestState, reason: str, stop_reason: str) -> None:
        state.finished = True
        chunk.finished = True
        chunk.finish_reason = reason
        chunk.stop_reason = stop_reason
        chunk.prompt_tokens = len(state.request.prompt_token_ids)
        chunk.completion_tokens = state.num_output_tokens
        chunk.served_by = tuple(state.served_by)
        now = time.monotonic()
        self.metrics.e2e.observe(now - state.arrival)
        if state.first_token_at is not None and state.num_output_tokens > 1:
            self.metrics.tpot.observe((now - state.first_token_at) / (state.num_output_tokens - 1))

    def _observe_tokens(self, state: RequestState, token_ids: list[int], now: float) -> None:
        n = len(token_ids)
        if n <= 0:
            return
        state.output_token_ids.extend(token_ids)
        if state.first_token_at is None:
            state.first_token_at = now
            self.metrics.ttft.observe(now - state.arrival)
        elif state.last_token_at is not None:
            self.metrics.itl.observe((now - state.last_token_at) / n)
        if state.handoff_at is not None:
            self.metrics.handoff.observe(now - state.handoff_at)
            state.handoff_at = None
        if state.resumed_migration is not None:
            rec, state.resumed_migration = state.resumed_migration, None
            rec.downtime_s = now - (state.last_token_at or now)
            mark = rec.phases_s.pop("_t", None)
            if mark is not None:
                rec.phases_s["first_token"] = now - mark
            self._migration_finished(rec)
        state.last_token_at = now
        state.num_output_tokens += n
        self.metrics.generation_tokens.inc(n)

    def _release(self, state: RequestState) -> None:
        if state.resumed_migration is not None:  # ended before the destination's first token
            rec, state.resumed_migration = state.resumed_migration, None
            self._migration_finished(rec)
        if not state.finished:
            self._abort_quietly(state)  # client went away or the stream failed
        inst = self.instances.get(state.instance_id) if state.instance_id else None
        if inst is not None and state.request_id in inst.in_flight:
            self._leave(inst, state)
        self._release_prefill_hold(state)
        self.table.remove(state.request_id)

    def _release_prefill_hold(self, state: RequestState) -> None:
        """Idempotent: frees the prefill's held blocks if no decode instance fetched them."""
        if state.prefill_instance_id is None:
            return
        source = self.instances[state.prefill_instance_id]
        if source.serving:
            self.fire(source.actor.kv_release.remote(state.prefill_engine_id))

    def _abort_quietly(self, state: RequestState) -> None:
        inst = self.instances.get(state.instance_id) if state.instance_id else None
        if inst is None or not inst.serving:
            return
        self.fire(inst.actor.abort.remote([state.engine_request_id]))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def fire(self, ref) -> None:
        """A best-effort call with a deadline whose result nobody waits for."""
        task = asyncio.get_running_loop().create_task(self.call_actor(ref))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def call_actor(self, ref):
        return await asyncio.wait_for(ref, timeout=self.config.actor_call_timeout_s)

    # ---- live migration (router/migration.py runs the protocol) ----
    async def migrate(self, request_id: str, target: str | None = None, trigger: str = "admin",
                      mode: str = "live") -> MigrationRecord:
        """Moves a decoding request to decode instance `target` (None: the freest other one)
        while it keeps running. Returns the finished record (committed or aborted)."""
        if mode not in MODES:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown migration mode {mode!r}")
        state = self.table.get(request_id)
        if state is None or state.finished:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no in-flight request with id {request_id!r}")
        src = self.instances.get(state.instance_id) if state.instance_id else None
        if state.phase != "decode" or src is None or src.role != "decode":
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"request {request_id!r} is not decoding on a decode instance (phase "
                               f"{state.phase}); only decode instances migrate requests")
        if state.migration is not None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"request {request_id!r} is already migrating ({state.migration.migration_id})")
        dst = self._migration_target(state, src, target)
        for inst in (src, dst):
            if inst.migrating is not None:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"instance {inst.instance_id} is already in migration {inst.migrating} "
                                   "(one at a time per instance)")
        self._migration_seq += 1
        rec = MigrationRecord(f"{state.engine_request_id}~m{self._migration_seq}", request_id,
                              src.instance_id, dst.instance_id, trigger=trigger)
        src.migrating = dst.migrating = rec.migration_id
        state.migration = rec
        self._migrations[rec.migration_id] = rec
        self.migration_stats.started += 1
        resumed = self._resumed[rec.migration_id] = asyncio.Event()
        try:
            await self.migrator.run(rec, state, src, dst, mode)
        finally:
            src.migrating = dst.migrating = None
            if state.migration is rec:
                state.migration = None
            if rec.state == MigrationState.ABORTED or state.resumed_migration is not rec:
                self._migration_finished(rec)
        # The caller gets the downtime too: wait (bounded) for the destination's first token.
        try:
            await asyncio.wait_for(resumed.wait(), self.migration_config.timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self._resumed.pop(rec.migration_id, None)
        return rec

    def _migration_target(self, state: RequestState, src: Instance, target: str | None) -> Instance:
        if target:
            dst = self.instances.get(target)
            if dst is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"no instance {target!r}")
            if dst.role != "decode" or not dst.ready:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"instance {target!r} is not a ready decode instance "
                                   f"({dst.role}, {dst.state.value})")
            if dst is src:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"request {state.request_id!r} already runs on {target!r}")
            return dst
        needed = blocks_for_tokens(len(state.request.prompt_token_ids) + len(state.output_token_ids) + 1,
                            src.info.block_size)
        views = [v for v in self._decode_views() if v.instance_id != src.instance_id]
        # Prefer an instance free to take it now; else name the busy one (refused just below).
        chosen = (pick_dispatch([v for v in views if not v.migrating], self.freeness, needed,
                                state.request.priority)
                  or pick_dispatch(views, self.freeness, needed, state.request.priority))
        if chosen is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"no other decode instance has room for request {state.request_id!r}")
        return self.instances[chosen]

    def _migration_finished(self, rec: MigrationRecord) -> None:
        if self._migrations.pop(rec.migration_id, None) is None:
            return  # already counted
        resumed = self._resumed.get(rec.migration_id)
        if resumed is not None:
            resumed.set()
        self.migration_stats.record(rec)
        observe = getattr(self.metrics, "observe_migration", None)
        if observe is not None:
            observe(rec)

    def migration_snapshot(self) -> dict:
        in_flight = [r for r in self._migrations.values() if not r.state.done]
        return self.migration_stats.snapshot(in_flight)

    async def drain(self, instance_id: str, timeout_s: float | None = None) -> DrainResult:
        """Sends nothing new to the instance and moves its running requests to other decode
        instances (prefill and colocated instances just finish theirs); returns when it is
        empty or the deadline passed. It stays draining until undrain()."""
        inst = self.instances.get(instance_id)
        if inst is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no instance {instance_id!r}")
        if not inst.serving:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"instance {instance_id!r} is {inst.state.value}, not serving")
        inst.state = InstanceState.DRAINING
        result = DrainResult(instance_id)
        deadline = time.monotonic() + (timeout_s or self.migration_config.drain_timeout_s)
        while inst.in_flight and time.monotonic() < deadline and inst.state == InstanceState.DRAINING:
            moved = False
            if inst.role == "decode":
                for request_id in sorted(inst.in_flight):
                    state = self.table.get(request_id)
                    if state is None or state.phase != "decode" or state.migration is not None:
                        continue
                    try:
                        rec = await self.migrate(request_id, None, trigger="drain")
                    except RequestError:
                        continue  # finished meanwhile, or nowhere to go yet: next round
                    result.migrations.append(rec)
                    if rec.state == MigrationState.COMMITTED:
                        result.migrated += 1
                        moved = True
                    else:
                        result.failed += 1
            if not moved:
                await asyncio.sleep(0.05)
        result.remaining = len(inst.in_flight)
        return result

    def undrain(self, instance_id: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no instance {instance_id!r}")
        if inst.state != InstanceState.DRAINING:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"instance {instance_id!r} is {inst.state.value}, not draining")
        inst.state = InstanceState.READY

    def _high_priority_count(self, inst: Instance) -> int:
        n = 0
        for request_id in inst.in_flight:
            state = self.table.get(request_id)
            if state is not None and is_high_priority(state.request.priority, self.freeness):
                n += 1
        return n

    def _decode_view(self, i: Instance) -> InstanceView:
        """The freeness policy's view of a decode instance with a load report."""
        return InstanceView(
            instance_id=i.instance_id, num_total_blocks=i.load.num_total_blocks,
            num_free_blocks=min(i.load.num_free_blocks, i.load.num_total_blocks),
            num_running=max(i.load.num_running, len(i.in_flight)), num_waiting=i.load.num_waiting,
            head_waiting_blocks=i.load.head_waiting_blocks, draining=i.state == InstanceState.DRAINING,
            high_priority_running=self._high_priority_count(i), migrating=i.migrating is not None)

    def _decode_views(self) -> list[InstanceView]:
        return [self._decode_view(i) for i in self.instances.values()
                if i.role == "decode" and i.serving and i.load is not None]

    async def _balance_loop(self) -> None:
        """Llumnix's periodic pairing: the most loaded decode instances give a request each to
        the freest ones (thresholds and selection policy in MigrationConfig)."""
        while not self._stopping:
            await asyncio.sleep(self.migration_config.interval_s)
            try:
                self.balance_once()
            except Exception:
                log.exception("migration pairing round failed")

    def balance_once(self) -> list[tuple[str, str, str]]:
        """One pairing round; starts the chosen migrations. Returns (request, source, target)."""
        views = {v.instance_id: v for v in self._decode_views()}
        started = []
        now = time.monotonic()
        for src_id, dst_id in pair_migrations(list(views.values()), self.freeness):
            src = self.instances[src_id]
            candidates = []
            for request_id in src.in_flight:
                state = self.table.get(request_id)
                if (state is None or state.phase != "decode" or state.migration is not None or state.finished
                        or state.migration_backoff_until > now):
                    continue
                num_tokens = len(state.request.prompt_token_ids) + len(state.output_token_ids)
                num_blocks = blocks_for_tokens(num_tokens + 1, src.info.block_size)
                candidates.append(RequestView(request_id, src_id, num_blocks,
                                              num_tokens, state.request.priority, now - state.arrival))
            chosen = select_request(candidates, self.freeness, available_blocks(views[dst_id], self.freeness),
                                    source_draining=views[src_id].draining)
            if chosen is None:
                continue
            started.append((chosen.request_id, src_id, dst_id))
            self._spawn(self._migrate_quietly(chosen.request_id, dst_id, "balance"))
        return started

    async def _migrate_quietly(self, request_id: str, target: str, trigger: str) -> None:
        try:
            rec = await self.migrate(request_id, target, trigger=trigger)
            state = self.table.get(request_id)
            if rec.state == MigrationState.ABORTED and state is not None:
                # E.g. preempted on the source (no KV to move until it runs again) or no room:
                # let a few pairing rounds pass before choosing it again.
                state.migration_backoff_until = time.monotonic() + 5 * self.migration_config.interval_s
        except RequestError as exc:  # it finished, or the pair changed since the round
            log.debug("%s migration of %s skipped: %s", trigger, request_id, exc.message)

    # ---- per-instance output pump ----
    async def _pump(self, inst: Instance) -> None:
        wait_s = self.config.poll_wait_s
        while not self._stopping and inst.state != InstanceState.DEAD:
            try:
                batch = await asyncio.wait_for(inst.actor.poll.remote(wait_s),
                                               timeout=wait_s + self.config.actor_call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a poll that fails in any way means the instance is gone
                self._mark_dead(inst, f"poll failed: {type(exc).__name__}: {exc}")
                return
            inst.load = batch.load
            for delta in batch.deltas:
                state = self.table.get(delta.request_id.rpartition("@")[0])
                if (state is not None and state.instance_id == inst.instance_id
                        and state.engine_request_id == delta.request_id):
                    state.deltas.put_nowait(delta)
            if batch.fatal_error:
                self._mark_dead(inst, batch.fatal_error)
                return

    def _mark_dead(self, inst: Instance, reason: str) -> None:
        if inst.state == InstanceState.DEAD:
            return
        log.error("instance %s is dead: %s", inst.instance_id, reason)
        inst.state = InstanceState.DEAD
        inst.death_reason = reason
        if self._respawn_fn is not None and not self._stopping:
            self._spawn(self._respawn(inst))
        for request_id in list(inst.in_flight):
            state = self.table.get(request_id)
            if state is not None:
                state.deltas.put_nowait(TokenDelta(state.engine_request_id, [], True, "dead",
                                                   error=f"instance {inst.instance_id} died: {reason}"))

    async def _respawn(self, inst: Instance) -> None:
        """Replaces a dead instance with a fresh actor of the same pool; it rejoins when ready."""
        try:
            ray.kill(inst.actor)  # a hung actor must not come back to life half-way
        except ray.exceptions.RayError as exc:
            log.debug("killing dead instance %s: %s", inst.instance_id, exc)
        delay = 1.0
        while not self._stopping:
            inst.state = InstanceState.STARTING
            try:
                actor = self._respawn_fn(inst.info)
                info = await asyncio.wait_for(actor.info.remote(), timeout=self.config.startup_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any start-up failure: retry with backoff
                log.error("respawning %s failed (%s); retrying in %.0fs", inst.instance_id, exc, delay)
                inst.state = InstanceState.DEAD
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            inst.actor, inst.info, inst.load = actor, info, None
            inst.in_flight.clear()
            inst.queued_prompt_tokens = 0
            inst.restarts += 1
            inst.state = InstanceState.READY
            log.warning("instance %s is back (restart %d)", inst.instance_id, inst.restarts)
            self._start_pump(inst)
            return
