"""FrontEnd: one front door of a deployment — it takes validated requests (from the gRPC server
and the HTTP API), asks the global scheduler where each goes, adds it to that engine under its
own name, pulls the token batches of its own requests straight from the engines (one long-poll
per engine, router/engine_links.py), and turns them into one client stream per request (text,
stop strings, usage). Any number of front ends serve one deployment; each is stateless beyond
the streams it owns.

Colocated mode: one engine serves a request from prompt to finish. Disaggregated mode: a
prefill instance computes the prompt and the first token; the front end then hands the request
(prompt + first token) to a decode instance, which pulls the prompt's KV from the prefill
instance and decodes the rest (or, with `--kv-push layerwise`, the decode instance is chosen
and reserves blocks before the prefill starts, and the prefill pushes each layer's KV into
them as it computes it; the hand-off then only waits for the last layer). A live migration
(the scheduler's decision) moves the request between decode engines: the source's "migrated"
marker names where it continues, and the stream follows it there. An engine that dies has the
request replayed elsewhere (prompt + tokens so far). The client sees one stream.

The scheduler decides placement; when it cannot be reached (Ray is restarting it) the front
end places requests on its own view for the time being, so serving goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from cluster.config import DeploymentConfig, MigrationConfig, RouterConfig, TransferConfig
from cluster.kv.prefix_hash import block_hashes
from cluster.protocol import EngineRequest, TokenDelta, client_request_id
from router.detokenizer import StopStringMatcher, make_detokenizer
from router.engine_links import SERVING_STATES, EngineLink, local_choice
from router.errors import RequestError
from router.metrics import RouterMetrics
from router.migration_types import DrainResult, MigrationRecord
from router.request_table import RequestState, RequestTable
from router.scheduler import raise_if_error
from router.tasks import fire, spawn_tracked
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


# A poll that failed is retried after this long if the scheduler still lists the engine.
_RETRY_FAILED_S = 5.0


class _InstanceFailed(Exception):
    """An instance failed while taking a request; the request is placed again elsewhere."""


class FrontEnd:
    def __init__(self, config: RouterConfig, scheduler, tokenizer, frontend_id: str,
                 migration: MigrationConfig | None = None, deployment: DeploymentConfig | None = None,
                 metrics: RouterMetrics | None = None, actor_lookup=None, info: dict | None = None,
                 transfer: TransferConfig | None = None):
        """`scheduler`: the global scheduler's actor handle; `actor_lookup(instance_id)`: the
        engine actor's handle by name (blocking; run in a thread); `info`: what `status` shows
        about this front end (address, pid, node)."""
        self.config = config
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.frontend_id = frontend_id
        self.migration_config = migration or MigrationConfig()
        self.deployment = deployment or DeploymentConfig()
        self.transfer = transfer or TransferConfig()
        self.metrics = metrics or RouterMetrics(migrations=False)
        self.actor_lookup = actor_lookup
        self.info = dict(info or {})
        self.table = RequestTable()
        self.links: dict[str, EngineLink] = {}
        self.requests_total = 0
        self.started_at = time.time()
        self.view_version = None  # (scheduler incarnation, view version) of the view we have
        self.scheduler_reachable = False
        self.scheduler_incarnation = 0
        self._migration_metrics = ""
        self._attempt_tag = uuid.uuid4().hex[:6]
        self._attempts = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    # ---- lifecycle ----
    async def start(self, timeout_s: float = 60.0) -> None:
        """Registers with the scheduler, builds the view of the engines, starts the pumps."""
        deadline = time.monotonic() + timeout_s
        while True:
            if await self._heartbeat() and any(link.info.max_model_len for link in self.links.values()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"front end {self.frontend_id}: no answer from the scheduler, or no engine "
                                   f"ready, after {timeout_s:.0f}s")
            await asyncio.sleep(0.5)
        self.metrics.watch(self)
        self.metrics.watch_scheduler(lambda: self._migration_metrics)
        self._spawn(self._heartbeat_loop())

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks) + [link.pump for link in self.links.values() if link.pump is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def instances(self) -> dict[str, EngineLink]:
        """The engines as this front end sees them (metrics, health)."""
        return self.links

    @property
    def disaggregated(self) -> bool:
        roles = {link.role for link in self.links.values()}
        return {"prefill", "decode"} <= roles

    def ready(self, role: str) -> list[EngineLink]:
        return [link for link in self.links.values() if link.ready and link.role == role]

    def health_problem(self) -> str | None:
        """Why this front end cannot take a request now, or None."""
        roles = sorted({link.role for link in self.links.values()})
        missing = [role for role in roles if not self.ready(role)]
        return f"no ready {' or '.join(missing)} instance" if missing else None

    def limits_info(self):
        """The InstanceInfo requests are validated against (the first instance's)."""
        infos = [link.info for link in sorted(self.links.values(), key=lambda link: link.instance_id)
                 if link.info.max_model_len]
        return infos[0] if infos else None

    # ---- the scheduler ----
    def _stats(self) -> dict:
        return {"requests_in_flight": len(self.table), "requests_total": self.requests_total,
                "uptime_s": time.time() - self.started_at}

    async def _heartbeat(self) -> bool:
        try:
            reply = await asyncio.wait_for(self.scheduler.frontend_heartbeat.remote(
                self.frontend_id, self.info, self._stats(), self.view_version), self.config.actor_call_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - restarting (or gone): serve from the view we have
            if self.scheduler_reachable:
                log.warning("front end %s: scheduler unreachable (%s: %s); placing requests on its own view",
                            self.frontend_id, type(exc).__name__, exc)
            self.scheduler_reachable = False
            return False
        if not self.scheduler_reachable and self.scheduler_incarnation:
            log.warning("front end %s: scheduler back (start %d)", self.frontend_id, reply["incarnation"])
        self.scheduler_reachable = True
        self.scheduler_incarnation = reply["incarnation"]
        self._migration_metrics = reply.get("migration_metrics", "")
        if "instances" in reply:
            await self._apply_view(reply["instances"])
            self.view_version = reply["version"]
        self._revive_pumps()
        return True

    async def _heartbeat_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.deployment.heartbeat_s)
            await self._heartbeat()

    async def _apply_view(self, entries: list[dict]) -> None:
        seen = set()
        for entry in entries:
            info, state, restarts = entry["info"], entry["state"], entry["restarts"]
            iid = info.instance_id
            seen.add(iid)
            link = self.links.get(iid)
            if link is not None and link.restarts == restarts:
                link.state = state
                if info.max_model_len:
                    link.info = info
                continue
            # A new instance, or a new incarnation of one: a fresh actor behind the same name.
            actor = None
            if state != "dead" and self.actor_lookup is not None:
                try:
                    actor = await asyncio.to_thread(self.actor_lookup, iid)
                except Exception as exc:  # noqa: BLE001 - not registered yet: the next heartbeat retries
                    log.debug("looking up engine %s: %s", iid, exc)
                    continue
            if link is not None and link.pump is not None:
                link.pump.cancel()
            new = EngineLink(info, state, restarts, actor)
            if link is not None:
                new.requests = link.requests
                self._link_failed(link, link.actor, f"instance {iid} was replaced (restart {restarts})")
            self.links[iid] = new
        for iid in [i for i in self.links if i not in seen]:  # scaled in
            link = self.links.pop(iid)
            if link.pump is not None:
                link.pump.cancel()

    def _revive_pumps(self) -> None:
        """Every serving engine has a pump (a poll that failed is tried again a while later if
        the scheduler still lists that incarnation as serving: it was slow, not dead)."""
        now = time.monotonic()
        for link in self.links.values():
            if link.state in SERVING_STATES and link.actor is not None and not link.pumping:
                if link.failed is not None and now - link.failed_at < _RETRY_FAILED_S:
                    continue
                link.failed = None
                link.pump = asyncio.get_running_loop().create_task(self._pump(link, link.actor),
                                                                   name=f"pump-{link.instance_id}")

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
            # Maybe another front end's stream (behind one Service): the scheduler knows where it runs.
            try:
                found = await asyncio.wait_for(self.scheduler.abort_request.remote(request_id),
                                               self.config.actor_call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - scheduler restarting: nothing else knows the id
                found = 0
            if not found:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"no in-flight request with id {request_id!r}")
            return
        state.abort_requested = True
        # End the stream here, whatever phase the request is in; the engine side follows.
        state.deltas.put((state.instance_id, TokenDelta(state.engine_request_id or request_id, [], True, "abort")))
        link = self.links.get(state.instance_id) if state.instance_id else None
        if link is not None and link.serving:
            await self.call_actor(link.actor.abort.remote([state.engine_request_id]))

    def remaining(self, state: RequestState):
        """What is left of a request: prompt + tokens streamed so far, and the sampling budget
        that remains. A first placement, a hand-off and a replay all start from this."""
        req = state.request
        done = len(state.output_token_ids)
        sampling = dataclasses.replace(req.sampling, max_tokens=req.sampling.max_tokens - done,
                                       min_tokens=max(0, req.sampling.min_tokens - done))
        return req.prompt_token_ids + tuple(state.output_token_ids), sampling

    def next_attempt(self, state: RequestState) -> str:
        """Engine-side ids are unique per attempt, front end and time (an engine runs an id
        once), so a replay never collides with leftovers, nor a reused client id with its
        earlier request, nor one front end's request with another's of the same client id."""
        state.attempt += 1
        state.follow(f"{state.request_id}@{next(self._attempts)}.{self._attempt_tag}", state.instance_id)
        return state.engine_request_id

    def _engine_request(self, state: RequestState, engine_id: str, prompt, sampling, kv=None) -> EngineRequest:
        return EngineRequest(engine_id, prompt, sampling, state.request.priority, kv_transfer=kv,
                             owner=self.frontend_id, arrival=state.arrival_wall)

    async def _place(self, state: RequestState, exclude: tuple[str, ...] = ()) -> None:
        prompt, sampling = self.remaining(state)
        engine_id = self.next_attempt(state)
        if self.disaggregated and sampling.max_tokens > 1:
            await self._place_prefill(state, engine_id, prompt, sampling, exclude)
            return
        role = "prefill" if self.disaggregated else "colocated"
        link = await self._pick(role, engine_id, len(prompt), state.request.priority, exclude,
                                prompt=prompt, session_id=state.request.session_id)
        state.phase = "single"
        engine_request = self._engine_request(state, engine_id, prompt, sampling)
        await self._add(link, state, engine_id, link.actor.add_request.remote(engine_request))

    async def _place_prefill(self, state: RequestState, engine_id: str, prompt, sampling, exclude) -> None:
        link = await self._pick("prefill", engine_id, len(prompt), state.request.priority, exclude,
                                prompt=prompt, session_id=state.request.session_id)
        one_token = dataclasses.replace(sampling, max_tokens=1, min_tokens=min(1, sampling.min_tokens))
        kv = {"do_remote_decode": True, "transfer_id": engine_id}
        if self.transfer.push == "layerwise":
            target = await self._reserve_push(state, engine_id, len(prompt))
            if target is not None:
                kv["push"] = target
        engine_request = self._engine_request(state, engine_id, prompt, one_token, kv)
        state.phase = "prefill"
        state.prefill_instance_id = link.instance_id
        state.prefill_engine_id = engine_id
        state.prefill_tokens = len(prompt)
        try:
            await self._add(link, state, engine_id, link.actor.add_request.remote(engine_request))
        except _InstanceFailed:
            self._cancel_push(state)
            raise

    async def _reserve_push(self, state: RequestState, transfer_id: str, num_tokens: int) -> dict | None:
        """Layer-wise push: the decode instance is chosen now and reserves the prompt's blocks.
        None (the request then hands off by pull) when it has no room, does not support it or
        does not answer."""
        target = await self._pick("decode", transfer_id, num_tokens, state.request.priority)
        try:
            reply = await self.call_actor(target.actor.push_reserve.remote(transfer_id, num_tokens))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to pulling
            reply = {"status": f"failed: {type(exc).__name__}: {exc}"}
        if reply.get("status") != "ok":
            log.info("layer-wise push of %s to %s not possible (%s): pulling instead", transfer_id,
                     target.instance_id, reply.get("reason") or reply.get("status"))
            self._unplace(target.instance_id, transfer_id)
            self.metrics.kv_handoffs.labels(mode="pull_no_reservation").inc()
            return None
        state.push_instance_id = target.instance_id
        return reply["target"]  # a PushTarget as plain data (front ends do not import vLLM)

    def _cancel_push(self, state: RequestState) -> None:
        """Frees a push reservation the request will not use (it ended, failed or replays)."""
        instance_id, state.push_instance_id = state.push_instance_id, None
        if instance_id is None:
            return
        self._unplace(instance_id, state.prefill_engine_id)
        target = self.links.get(instance_id)
        if target is not None and target.serving:
            self.fire(target.actor.push_cancel.remote(state.prefill_engine_id))

    async def _handoff(self, state: RequestState) -> None:
        """Prefill done: move the request (prompt + tokens so far) to a decode instance."""
        source = self.links.get(state.prefill_instance_id)
        if source is None or not source.serving:
            raise _InstanceFailed(f"prefill instance {state.prefill_instance_id} is gone")
        prompt, sampling = self.remaining(state)
        transfer_id = state.prefill_engine_id
        pushed_to = self.links.get(state.push_instance_id) if state.push_instance_id else None
        if pushed_to is not None and not pushed_to.serving:
            self._cancel_push(state)  # the reserved decode instance died: pull elsewhere
            pushed_to = None
        state.push_instance_id = None
        target = pushed_to or await self._pick("decode", transfer_id, len(prompt), state.request.priority)
        engine_request = self._engine_request(state, transfer_id, prompt, sampling,
                                              {"do_remote_prefill": True, "transfer_id": transfer_id})
        source.requests.discard(state.request_id)
        state.phase = "decode"
        state.handoff_at = time.monotonic()
        if pushed_to is not None:
            # The last layer left the prefill before its token did: the wait is short. An
            # incomplete push falls back to pulling the prefill's hold on the decode side.
            wait_s = min(self.transfer.timeout_s, self.config.actor_call_timeout_s / 2)
            ref = target.actor.push_commit.remote(transfer_id, engine_request, state.prefill_tokens,
                                                  source.instance_id, source.actor, wait_s)
            mode = await self._add(target, state, transfer_id, ref)  # "pushed", or "pulled" as a fallback
            self.metrics.kv_handoffs.labels(mode=str(mode)).inc()
            return
        ref = target.actor.add_transferred.remote(engine_request, source.instance_id, source.actor,
                                                  state.prefill_tokens, source.info.node_id)
        await self._add(target, state, transfer_id, ref)
        self.metrics.kv_handoffs.labels(mode="pull").inc()

    async def _place_resilient(self, state: RequestState, failure: str | None = None,
                               failed_on: str | None = None) -> None:
        """Places the request (or, after `failure`, replays it), moving on past instances that
        fail while taking it, within the request's replay budget."""
        while True:
            try:
                if failure is None:
                    await self._place(state)
                else:
                    await self._replay(state, failure, failed_on)
                return
            except _InstanceFailed as exc:
                failure, failed_on = str(exc), exc.args[1] if len(exc.args) > 1 else None

    async def _replay(self, state: RequestState, reason: str, failed_on: str | None) -> None:
        """The instance serving the request died (or will not run it): run what is left of it
        elsewhere."""
        state.replays += 1
        if state.replays > self.config.max_replays:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"request failed after {self.config.max_replays} replay(s); last error: {reason}")
        log.warning("replaying request %s (%d tokens streamed) after: %s", state.request_id,
                    len(state.output_token_ids), reason)
        self.metrics.replays.inc()
        self._abort_quietly(state)  # whatever is left of the attempt, if its engine lives
        link = self.links.get(state.instance_id) if state.instance_id else None
        if link is not None:
            link.requests.discard(state.request_id)
        state.awaiting_continuation_since = None
        state.resumed_migration = None
        self._abort_held(state)
        self._cancel_push(state)
        self._release_prefill_hold(state)
        await self._place(state, exclude=(failed_on,) if failed_on else ())

    async def _pick(self, role: str, engine_id: str, num_tokens: int, priority: int,
                    exclude: tuple[str, ...] = (), prompt=None, session_id: str = "") -> EngineLink:
        """The scheduler's choice (or, while it is unreachable, this front end's own); while
        every instance of the role is being replaced, waits (bounded) for one to come back.
        `prompt` (what a prefill or colocated instance computes) is named block by block for
        prefix-aware routing; `session_id` keeps a conversation on its instance."""
        hashes = self._prefix_hashes(prompt)
        deadline = time.monotonic() + self.config.instance_wait_s
        while True:
            reply = None
            if self.scheduler_reachable:
                try:
                    extra = {"prefix_hashes": hashes, "session_id": session_id} if hashes or session_id else {}
                    reply = await asyncio.wait_for(self.scheduler.place.remote(
                        role, engine_id, num_tokens, priority, self.frontend_id, tuple(exclude), **extra),
                        self.config.actor_call_timeout_s)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - restarting: fall back to our own view
                    log.warning("front end %s: place failed (%s); placing on its own view", self.frontend_id, exc)
                    self.scheduler_reachable = False
            if reply is None:
                chosen = local_choice(list(self.links.values()), role, set(exclude))
                reply = {"instance_id": chosen} if chosen else {"wait": f"no {role} instance in this front end's view"}
            raise_if_error(reply)
            if "instance_id" in reply:
                link = self.links.get(reply["instance_id"])
                if link is None or ("restarts" in reply and link.restarts != reply["restarts"]):
                    await self._heartbeat()  # our view is behind the scheduler's
                    link = self.links.get(reply["instance_id"])
                if link is not None and link.serving:
                    return link
                self._unplace(reply["instance_id"], engine_id)
            if time.monotonic() > deadline:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no {role} instance is available")
            await asyncio.sleep(0.1)

    def _prefix_hashes(self, prompt) -> tuple[int, ...]:
        """The prompt's full blocks named as the engines name what they cache (every instance
        of a deployment has the same block size); () without a prompt or an instance view."""
        if not prompt:
            return ()
        block_size = next((link.info.block_size for link in self.links.values() if link.info.block_size), 0)
        return tuple(block_hashes(prompt, block_size)) if block_size else ()

    def _unplace(self, instance_id: str, engine_id: str) -> None:
        if self.scheduler_reachable:
            self.fire(self.scheduler.unplace.remote(instance_id, engine_id))

    async def _add(self, link: EngineLink, state: RequestState, engine_id: str, ref):
        """Awaits the engine's acceptance (`ref`); returns its answer."""
        state.instance_id = link.instance_id
        link.requests.add(state.request_id)
        if not link.pumping:
            self._revive_pumps()
        try:
            answer = await self.call_actor(ref)
        except Exception as exc:
            link.requests.discard(state.request_id)
            self._unplace(link.instance_id, engine_id)
            reason = f"instance {link.instance_id} did not accept the request: {type(exc).__name__}: {exc}"
            self._link_failed(link, link.actor, reason)
            raise _InstanceFailed(reason, link.instance_id) from exc
        state.served_by.append(link.instance_id)
        return answer

    # ---- the stream ----
    async def _stream(self, state: RequestState):
        req = state.request
        detok = make_detokenizer(self.tokenizer, req.prompt_token_ids)
        stops = StopStringMatcher(req.stop_strings)
        # A migration commits within its timeout; a continuation silent for twice that is lost.
        continuation_timeout = 2 * self.migration_config.timeout_s
        pending: list = []  # items taken from the inbox and not processed yet
        interval, sent_at = self.config.stream_interval_s, None
        while True:
            if not pending:
                if interval and sent_at is not None:
                    # Let tokens pile up until the interval since the last message has passed.
                    await asyncio.sleep(sent_at + interval - time.monotonic())
                waiting = state.awaiting_continuation_since
                timeout = None if waiting is None else max(0.0, waiting + continuation_timeout - time.monotonic())
                pending = await state.deltas.take_all(timeout)
                if not pending:  # the continuation never started on the destination
                    await self._place_resilient(state, f"migration's continuation never started on "
                                                       f"{state.instance_id}", state.instance_id)
                    continue
            chunk = Chunk(state.request_id)
            action = None  # what to do after yielding what the batch produced
            while pending and action is None:
                instance_id, delta = pending.pop(0)
                if delta.request_id != state.engine_request_id:
                    self._not_current(state, instance_id, delta)
                    continue
                if instance_id != state.instance_id:
                    continue  # e.g. the prefill's copy of an id the decode instance now runs
                if delta.finish_reason == "error":
                    raise RequestError(grpc.StatusCode.INTERNAL,
                                       f"instance {state.instance_id} failed the request: {delta.error}")
                if delta.finish_reason == "dead":
                    action = ("replay", delta.error or "instance died", instance_id)
                    break
                state.awaiting_continuation_since = None
                # Stopped for a migration: the tokens of its last steps (coalesced into this
                # delta) still go to the client; then the stream follows the request.
                migrated = delta.finish_reason == "migrated"
                state.output_token_ids.extend(delta.token_ids)
                # A prefill that ran to its one-token limit is not the end of the request.
                hand_off = state.phase == "prefill" and delta.finished and delta.finish_reason == "length"
                final = delta.finished and not hand_off and not migrated
                text = detok.push(delta.token_ids) if delta.token_ids else ""
                if final:
                    text += detok.flush()
                match = stops.feed(text, final=final)
                chunk.token_ids.extend(delta.token_ids)
                chunk.text += match.text
                if match.stopped_on is not None:
                    # The engine would keep generating past a stop string it never saw.
                    self._abort_quietly(state)
                    self._finish(chunk, state, "stop", match.stopped_on)
                elif final:
                    stop_reason = str(delta.stop_token_id) if delta.stop_token_id is not None else ""
                    self._finish(chunk, state, delta.finish_reason, stop_reason)
                if chunk.finished:
                    break
                if migrated:
                    action = ("follow", delta)
                elif hand_off:
                    action = ("handoff",)
            if chunk.token_ids:
                self._observe_tokens(state, len(chunk.token_ids), time.monotonic())
            if chunk.token_ids or chunk.text or chunk.finished:
                yield chunk
                sent_at = time.monotonic()
            if chunk.finished:
                return
            if action is None:
                continue
            if action[0] == "replay":
                await self._place_resilient(state, action[1], action[2])
            elif action[0] == "follow":
                pending[:0] = self._follow(state, action[1])
            elif action[0] == "handoff":
                try:
                    await self._handoff(state)
                except _InstanceFailed as exc:
                    await self._place_resilient(state, str(exc), exc.args[1] if len(exc.args) > 1 else None)

    def _not_current(self, state: RequestState, instance_id: str, delta: TokenDelta) -> None:
        """A delta of another engine-side id of this request. A migration's continuation of the
        current id (named "<current id>~<migration>") may answer before the source's marker:
        it waits. Anything else is a leftover of an attempt the stream moved past (a replay
        raced a migration): it must not run on, so it is aborted where it runs."""
        if delta.request_id.startswith(state.engine_request_id + "~"):
            state.held.setdefault(delta.request_id, []).append((instance_id, delta))
            return
        if not delta.finished and delta.request_id not in state.stale_aborted:
            state.stale_aborted.add(delta.request_id)
            link = self.links.get(instance_id)
            if link is not None and link.serving:
                self.fire(link.actor.abort.remote([delta.request_id]))

    def _follow(self, state: RequestState, marker: TokenDelta) -> list:
        """The source stopped the request for a migration: the stream continues as the id the
        marker names, on its destination. Returns the destination's deltas that came first."""
        source = self.links.get(state.instance_id)
        if source is not None:
            source.requests.discard(state.request_id)
        if not marker.continued_as or not marker.migrated_to:
            # Stopped with nowhere to go (an engine older than the marker's fields): replay.
            return [(state.instance_id, TokenDelta(state.engine_request_id, [], True, "dead",
                                                   error="stopped for a migration that is gone"))]
        state.follow(marker.continued_as, marker.migrated_to)
        state.served_by.append(marker.migrated_to)
        state.resumed_migration = marker.migration_id
        state.awaiting_continuation_since = time.monotonic()
        target = self.links.get(marker.migrated_to)
        if target is not None:
            target.requests.add(state.request_id)
        first = state.held.pop(marker.continued_as, [])
        if target is None or target.failed is not None or target.state == "dead":
            why = target.failed if target is not None and target.failed else "not serving"
            first.append((marker.migrated_to, TokenDelta(marker.continued_as, [], True, "dead",
                                                         error=f"instance {marker.migrated_to}: {why}")))
        return first

    def _finish(self, chunk: Chunk, state: RequestState, reason: str, stop_reason: str) -> None:
        state.finished = True
        chunk.finished = True
        chunk.finish_reason = reason
        chunk.stop_reason = stop_reason
        chunk.prompt_tokens = len(state.request.prompt_token_ids)
        chunk.completion_tokens = len(state.output_token_ids)
        chunk.served_by = tuple(state.served_by)
        now = time.monotonic()
        self.metrics.e2e.observe(now - state.arrival)
        # This chunk's tokens are observed just after (_stream); count them in TPOT already.
        first = state.first_token_at if state.first_token_at is not None else now
        if chunk.completion_tokens > 1:
            self.metrics.tpot.observe((now - first) / (chunk.completion_tokens - 1))

    def _observe_tokens(self, state: RequestState, n: int, now: float) -> None:
        """Latency metrics of `n` tokens reaching the client at `now` (once per message; the
        tokens themselves are already in state.output_token_ids)."""
        if state.first_token_at is None:
            state.first_token_at = now
            self.metrics.ttft.observe(now - state.arrival)
        elif state.last_token_at is not None:
            self.metrics.itl.observe((now - state.last_token_at) / n)
        if state.handoff_at is not None:
            self.metrics.handoff.observe(now - state.handoff_at)
            state.handoff_at = None
        if state.resumed_migration is not None:
            migration_id, state.resumed_migration = state.resumed_migration, None
            downtime = now - (state.last_token_at or now)
            self.fire(self.scheduler.migration_resumed.remote(migration_id, downtime, time.time()))
        state.last_token_at = now
        self.metrics.generation_tokens.inc(n)

    def _release(self, state: RequestState) -> None:
        if not state.finished:
            self._abort_quietly(state)  # client went away or the stream failed
        link = self.links.get(state.instance_id) if state.instance_id else None
        if link is not None:
            link.requests.discard(state.request_id)
        self._abort_held(state)
        self._cancel_push(state)
        self._release_prefill_hold(state)
        self.table.remove(state.request_id)

    def _abort_held(self, state: RequestState) -> None:
        """Continuations the stream will not follow (it replays, or ended) must not run on."""
        for engine_id, items in state.held.items():
            for instance_id, delta in items[-1:]:
                held_on = self.links.get(instance_id)
                if not delta.finished and held_on is not None and held_on.serving:
                    self.fire(held_on.actor.abort.remote([engine_id]))
        state.held.clear()

    def _release_prefill_hold(self, state: RequestState) -> None:
        """Idempotent: frees the prefill's held blocks if no decode instance fetched them."""
        if state.prefill_instance_id is None:
            return
        source = self.links.get(state.prefill_instance_id)
        if source is not None and source.serving:
            self.fire(source.actor.kv_release.remote(state.prefill_engine_id))

    def _abort_quietly(self, state: RequestState) -> None:
        link = self.links.get(state.instance_id) if state.instance_id else None
        if link is None or not link.serving or not state.engine_request_id:
            return
        self.fire(link.actor.abort.remote([state.engine_request_id]))

    # ---- pumps ----
    async def _pump(self, link: EngineLink, actor) -> None:
        """This front end's long-poll of one engine: its requests' deltas into their streams."""
        wait_s = self.config.poll_wait_s
        poll = actor.poll
        table = self.table._requests
        iid = link.instance_id
        while not self._stopping and link.actor is actor:
            try:
                batch = await asyncio.wait_for(poll.remote(wait_s, self.frontend_id),
                                               timeout=wait_s + self.config.actor_call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a poll that fails in any way means the engine is gone
                self._link_failed(link, actor, f"poll failed: {type(exc).__name__}: {exc}")
                return
            link.load = batch.load
            strays = None
            for delta in batch.deltas:
                state = table.get(client_request_id(delta.request_id))
                if state is not None:
                    state.deltas.put((iid, delta))
                elif not delta.finished:  # its stream ended: nobody reads it, stop it
                    strays = strays or []
                    strays.append(delta.request_id)
            if strays:
                self.fire(actor.abort.remote(strays))
            if batch.fatal_error:
                self._link_failed(link, actor, batch.fatal_error)
                return

    def _link_failed(self, link: EngineLink, actor, reason: str) -> None:
        """This front end lost the engine (poll or add failed, or it was replaced): its
        requests there replay; the scheduler hears of it."""
        if link.failed is not None or actor is None or self.links.get(link.instance_id) is not link:
            return  # already known, or an old incarnation (the instance id has a new link)
        log.error("front end %s: instance %s is unreachable: %s", self.frontend_id, link.instance_id, reason)
        link.failed = reason
        link.failed_at = time.monotonic()
        if self.scheduler_reachable:
            self.fire(self.scheduler.report_dead.remote(link.instance_id, link.restarts, reason))
        for state in self.table:
            if state.instance_id == link.instance_id and not state.finished:
                state.deltas.put((link.instance_id, TokenDelta(
                    state.engine_request_id, [], True, "dead", error=f"instance {link.instance_id} died: {reason}")))

    # ---- admin: the scheduler decides ----
    async def migrate(self, request_id: str, target: str | None = None, trigger: str = "admin",
                      mode: str = "live") -> MigrationRecord:
        return raise_if_error(await self._admin(self.scheduler.migrate.remote(request_id, target, trigger, mode)))

    async def drain(self, instance_id: str, timeout_s: float | None = None) -> DrainResult:
        return raise_if_error(await self._admin(self.scheduler.drain.remote(instance_id, timeout_s)))

    async def undrain(self, instance_id: str) -> None:
        raise_if_error(await self._admin(self.scheduler.undrain.remote(instance_id)))

    async def migration_stats(self):
        """The scheduler's MigrationStats (counters and recent downtimes; benchmarks)."""
        return await self._admin(self.scheduler.migration_stats.remote())

    async def migration_status(self) -> dict:
        """MigrationStats.snapshot() of the scheduler (what status shows)."""
        return (await self.cluster_status()).get("migrations") or {}

    async def _admin(self, ref):
        try:
            return await ref
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"the scheduler did not answer ({type(exc).__name__}); it restarts on its "
                               "own: retry") from exc

    async def cluster_status(self) -> dict:
        """The scheduler's status with this front end's own numbers live; from this front end's
        view alone while the scheduler is unreachable."""
        try:
            status = await asyncio.wait_for(self.scheduler.status.remote(), self.config.actor_call_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - restarting: say so, show what we know
            status = self._local_status(f"{type(exc).__name__}: {exc}")
        if (status.get("scheduler") or {}).get("state") == "starting":  # its view is not rebuilt yet
            status["instances"] = self._local_status("")["instances"]
        mine = {**self.info, **self._stats(), "frontend_id": self.frontend_id, "state": "serving",
                "last_seen_s": 0.0}
        frontends = [f for f in status.get("frontends", []) if f["frontend_id"] != self.frontend_id] + [mine]
        frontends.sort(key=lambda f: f["frontend_id"])
        serving = [f for f in frontends if f["state"] == "serving"]
        status["frontends"] = frontends
        status["requests_in_flight"] = sum(int(f.get("requests_in_flight", 0)) for f in serving)
        status["requests_total"] = sum(int(f.get("requests_total", 0)) for f in frontends)
        status["uptime_s"] = time.time() - self.started_at
        return status

    def _local_status(self, why: str) -> dict:
        roles = {link.role for link in self.links.values()}
        return {"deployment": self.deployment.name, "model": "", "frontends": [],
                "mode": "disaggregated" if {"prefill", "decode"} <= roles else "colocated",
                "instances": [{"info": link.info, "state": link.state if link.failed is None else "dead",
                               "load": link.load, "requests_served": 0, "death_reason": link.failed or "",
                               "restarts": link.restarts}
                              for link in sorted(self.links.values(), key=lambda link: link.instance_id)],
                "migrations": {}, "scheduler": {"state": f"unreachable: {why}"}}

    # ---- helpers ----
    async def call_actor(self, ref):
        return await asyncio.wait_for(ref, timeout=self.config.actor_call_timeout_s)

    def fire(self, ref) -> None:
        """A best-effort call with a deadline whose result nobody waits for."""
        fire(self.call_actor(ref))

    def _spawn(self, coro) -> asyncio.Task:
        return spawn_tracked(coro, self._tasks)
