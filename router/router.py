"""Router core: places requests on instances, pumps per-step token batches back from every
instance, and turns them into one client stream per request (text, stop strings, usage)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from cluster.config import RouterConfig
from cluster.protocol import EngineRequest, TokenDelta
from router.detokenizer import IncrementalDetokenizer, StopStringMatcher
from router.dispatcher import Candidate, least_loaded
from router.errors import RequestError
from router.instances import Instance, InstanceState
from router.metrics import RouterMetrics
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


class Router:
    def __init__(self, config: RouterConfig, instances: list[Instance], tokenizer,
                 metrics: RouterMetrics | None = None):
        self.config = config
        self.instances = {i.instance_id: i for i in instances}
        self.tokenizer = tokenizer
        self.metrics = metrics or RouterMetrics()
        self.table = RequestTable()
        self.requests_total = 0
        self.started_at = time.time()
        self._pumps: list[asyncio.Task] = []
        self._stopping = False

    # ---- lifecycle ----
    def start(self) -> None:
        for inst in self.instances.values():
            self.metrics.instance_up.labels(inst.instance_id, inst.role).set(1)
            self._pumps.append(asyncio.create_task(self._pump(inst), name=f"pump-{inst.instance_id}"))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    # ---- requests ----
    async def generate(self, request: ValidatedRequest):
        """Async iterator of Chunks; the last one has finished=True. Raises RequestError."""
        request_id = request.client_request_id or uuid.uuid4().hex
        state = RequestState(request_id, request)
        self.table.add(state)
        self.requests_total += 1
        self.metrics.in_flight.inc()
        self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
        status, finish_reason = "OK", "none"
        try:
            await self._place(state)
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

    async def abort(self, request_id: str) -> None:
        state = self.table.get(request_id)
        if state is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no in-flight request with id {request_id!r}")
        state.abort_requested = True
        inst = self.instances.get(state.instance_id) if state.instance_id else None
        if inst is not None:
            await self._call(inst.actor.abort.remote([request_id]))
        else:  # not placed yet: end the stream directly
            state.deltas.put_nowait(TokenDelta(request_id, [], True, "abort"))

    async def _place(self, state: RequestState) -> None:
        ready = [i for i in self.instances.values() if i.ready]
        chosen = least_loaded([
            Candidate(i.instance_id, len(i.in_flight),
                      i.load.num_free_blocks if i.load else 0,
                      i.load.queued_prompt_tokens if i.load else 0)
            for i in ready
        ])
        if chosen is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no serving instance is available")
        inst = self.instances[chosen]
        req = state.request
        state.instance_id = chosen
        inst.in_flight.add(state.request_id)
        engine_request = EngineRequest(state.request_id, req.prompt_token_ids, req.sampling, req.priority)
        try:
            await self._call(inst.actor.add_request.remote(engine_request))
        except Exception as exc:
            inst.in_flight.discard(state.request_id)
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"instance {chosen} did not accept the request: {exc}") from exc
        state.served_by.append(chosen)

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
                raise RequestError(grpc.StatusCode.UNAVAILABLE, delta.error or "instance died")
            now = time.monotonic()
            self._observe_tokens(state, len(delta.token_ids), now)
            text = detok.push(delta.token_ids)
            if delta.finished:
                text += detok.flush()
            match = stops.feed(text, final=delta.finished)
            chunk = Chunk(state.request_id, list(delta.token_ids), match.text)
            if match.stopped_on is not None:
                # The engine would keep generating past a stop string it never saw.
                self._abort_quietly(state)
                self._finish(chunk, state, "stop", match.stopped_on)
            elif delta.finished:
                stop_reason = str(delta.stop_token_id) if delta.stop_token_id is not None else ""
                self._finish(chunk, state, delta.finish_reason, stop_reason)
            if chunk.token_ids or chunk.text or chunk.finished:
                yield chunk
            if chunk.finished:
                return

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

    def _observe_tokens(self, state: RequestState, n: int, now: float) -> None:
        if n <= 0:
            return
        if state.first_token_at is None:
            state.first_token_at = now
            self.metrics.ttft.observe(now - state.arrival)
        elif state.last_token_at is not None:
            self.metrics.itl.observe((now - state.last_token_at) / n)
        state.last_token_at = now
        state.num_output_tokens += n
        self.metrics.generation_tokens.inc(n)

    def _release(self, state: RequestState) -> None:
        if not state.finished:
            self._abort_quietly(state)  # client went away or the stream failed
        inst = self.instances.get(state.instance_id) if state.instance_id else None
        if inst is not None:
            inst.in_flight.discard(state.request_id)
            inst.requests_served += 1
        self.table.remove(state.request_id)

    def _abort_quietly(self, state: RequestState) -> None:
        inst = self.instances.get(state.instance_id) if state.instance_id else None
        if inst is None or not inst.ready:
            return
        task = asyncio.get_running_loop().create_task(self._call(inst.actor.abort.remote([state.request_id])))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _call(self, ref):
        return await asyncio.wait_for(ref, timeout=self.config.actor_call_timeout_s)

    # ---- per-instance output pump ----
    async def _pump(self, inst: Instance) -> None:
        wait_s = self.config.poll_wait_s
        while not self._stopping and inst.state != InstanceState.DEAD:
            try:
                batch = await asyncio.wait_for(inst.actor.poll.remote(wait_s),
                                               timeout=wait_s + self.config.actor_call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._mark_dead(inst, f"poll failed: {type(exc).__name__}: {exc}")
                return
            inst.load = batch.load
            self.metrics.observe_load(inst.instance_id, inst.role, batch.load)
            for delta in batch.deltas:
                state = self.table.get(delta.request_id)
                if state is not None and state.instance_id == inst.instance_id:
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
        self.metrics.instance_up.labels(inst.instance_id, inst.role).set(0)
        for request_id in list(inst.in_flight):
            state = self.table.get(request_id)
            if state is not None:
                state.deltas.put_nowait(TokenDelta(request_id, [], True, "dead",
                                                   error=f"instance {inst.instance_id} died: {reason}"))
