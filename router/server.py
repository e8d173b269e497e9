"""The gRPC server of a front end: DisaggServe service, standard health service and server
reflection, over router/frontend.py's FrontEnd."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import disagg_pb2 as pb
from router.errors import RequestError
from router.migration_types import DrainResult, MigrationRecord
from router.security import BearerTokenInterceptor, server_credentials
from router.validation import Limits, validate

if TYPE_CHECKING:  # annotations only: the servicer needs nothing else of the front end module
    from router.frontend import Chunk, FrontEnd

log = logging.getLogger(__name__)

_KV_FIELDS = set(pb.KVTransferStats.DESCRIPTOR.fields_by_name)
_SPEC_FIELDS = set(pb.SpecDecodeStats.DESCRIPTOR.fields_by_name)
_MIGRATION_FIELDS = set(pb.MigrationInfo.DESCRIPTOR.fields_by_name)
_MIGRATION_STATS_FIELDS = set(pb.MigrationStats.DESCRIPTOR.fields_by_name) - {"in_flight"}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DisaggServe"].full_name
_FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "abort": pb.FINISH_REASON_ABORT,
}


class _Unparsable:
    """Stands in for a request whose bytes are not a valid message (e.g. invalid UTF-8)."""

    def __init__(self, error: Exception):
        self.error = error


def _safe_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - hostile bytes: DecodeError, invalid UTF-8, ...
            return _Unparsable(exc)

    return parse


def _check_parsed(request) -> None:
    if isinstance(request, _Unparsable):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request is not a valid message (string fields must be UTF-8): {request.error}")


async def _abort(context, exc: RequestError) -> None:
    if exc.retry_after_ms is not None:
        context.set_trailing_metadata((("retry-after-ms", str(exc.retry_after_ms)),))
    await context.abort(exc.code, exc.message)


def add_servicer(servicer: DisaggServeServicer, server) -> None:
    """Like the generated add_DisaggServeServicer_to_server, but malformed request bytes reach
    the handler (and get INVALID_ARGUMENT) instead of failing inside gRPC with INTERNAL."""
    def handler(kind, fn, request_cls, response_cls):
        return kind(fn, request_deserializer=_safe_parser(request_cls),
                    response_serializer=response_cls.SerializeToString)

    handlers = {
        "Generate": handler(grpc.unary_stream_rpc_method_handler, servicer.Generate,
                            pb.GenerateRequest, pb.GenerateResponse),
        "Abort": handler(grpc.unary_unary_rpc_method_handler, servicer.Abort, pb.AbortRequest, pb.AbortResponse),
        "GetModelInfo": handler(grpc.unary_unary_rpc_method_handler, servicer.GetModelInfo,
                                pb.GetModelInfoRequest, pb.ModelInfo),
        "GetClusterStatus": handler(grpc.unary_unary_rpc_method_handler, servicer.GetClusterStatus,
                                    pb.GetClusterStatusRequest, pb.ClusterStatus),
        "Migrate": handler(grpc.unary_unary_rpc_method_handler, servicer.Migrate,
                           pb.MigrateRequest, pb.MigrateResponse),
        "Drain": handler(grpc.unary_unary_rpc_method_handler, servicer.Drain,
                         pb.DrainRequest, pb.DrainResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def chunk_to_proto(chunk: Chunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=chunk.request_id, token_ids=chunk.token_ids, text=chunk.text)
    if chunk.finished:
        msg.finished = True
        msg.finish_reason = _FINISH.get(chunk.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        msg.stop_reason = chunk.stop_reason
        msg.usage.prompt_tokens = chunk.prompt_tokens
        msg.usage.completion_tokens = chunk.completion_tokens
        msg.served_by.extend(chunk.served_by)
    return msg


def migration_to_proto(info: MigrationRecord | dict) -> pb.MigrationInfo:
    """A record, or its to_dict() (as in a stats snapshot), as a MigrationInfo."""
    d = info.to_dict() if isinstance(info, MigrationRecord) else info
    # A key the proto lacks is left out rather than failing status (a unit test pins the two).
    msg = pb.MigrationInfo(**{k: v for k, v in d.items()
                              if k in _MIGRATION_FIELDS and k != "downtime_s"})
    downtime = d.get("downtime_s")
    if downtime is not None:
        msg.downtime_s = downtime
    return msg


def migration_stats_to_proto(snapshot: dict) -> pb.MigrationStats:
    """MigrationStats.snapshot() output as a MigrationStats message."""
    fields = {k: v for k, v in snapshot.items() if k in _MIGRATION_STATS_FIELDS}
    in_flight = [migration_to_proto(r) for r in snapshot.get("in_flight", ())]
    return pb.MigrationStats(**fields, in_flight=in_flight)


def drain_to_proto(result: DrainResult) -> pb.DrainResponse:
    return pb.DrainResponse(instance_id=result.instance_id, migrated=result.migrated,
                            remaining=result.remaining, failed=result.failed,
                            migrations=[migration_to_proto(r) for r in result.migrations])


_ORPHANS: set[asyncio.Future] = set()  # detached operations nobody awaits any more (strong refs)


async def _detached(coro):
    """Awaits an admin operation that runs to its end even if the caller goes away: a client
    that drops a Migrate/Drain call must not cancel a migration halfway (the router finishes
    or aborts it cleanly on its own deadlines)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _ORPHANS.add(task)
        task.add_done_callback(_log_orphaned)
        raise


def _log_orphaned(task: asyncio.Future) -> None:
    _ORPHANS.discard(task)
    if task.cancelled():
        return
    exc = task.exception()  # also keeps asyncio from warning that nobody retrieved it
    if exc is not None and not isinstance(exc, RequestError):
        log.error("admin operation failed after its caller left: %r", exc)


class DisaggServeServicer:
    def __init__(self, router: FrontEnd, model_name: str, limits: Limits, block_size: int,
                 eos_token_ids, bos_token_id):
        self.router = router
        self.model_name = model_name
        self.limits = limits
        self.block_size = block_size
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id

    def _tokenize(self, text: str) -> list[int]:
        return self.router.tokenizer.encode(text)

    async def Generate(self, request, context):
        try:
            _check_parsed(request)
            validated = validate(request, self._tokenize, self.limits)
            async for chunk in self.router.generate(validated):
                yield chunk_to_proto(chunk)
        except RequestError as exc:
            await _abort(context, exc)

    async def Abort(self, request, context):
        try:
            _check_parsed(request)
            await self.router.abort(request.request_id)
        except RequestError as exc:
            await _abort(context, exc)
        return pb.AbortResponse()

    async def Migrate(self, request, context):
        try:
            _check_parsed(request)
            if not request.request_id:
                raise RequestError.invalid("request_id is required")
            record = await _detached(self.router.migrate(
                request.request_id, request.target_instance or None, trigger="admin"))
        except RequestError as exc:
            await _abort(context, exc)
        return pb.MigrateResponse(migration=migration_to_proto(record))

    async def Drain(self, request, context):
        try:
            _check_parsed(request)
            if not request.instance_id:
                raise RequestError.invalid("instance_id is required")
            if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
                raise RequestError.invalid(
                    f"timeout_s must be a finite number >= 0 (0: the server's default), "
                    f"got {request.timeout_s}")
            if request.cancel:
                await self.router.undrain(request.instance_id)
                return pb.DrainResponse(instance_id=request.instance_id)
            result = await _detached(self.router.drain(request.instance_id, request.timeout_s or None))
        except RequestError as exc:
            await _abort(context, exc)
        return drain_to_proto(result)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(
            model=self.model_name,
            max_model_len=self.limits.max_model_len,
            vocab_size=self.limits.vocab_size,
            block_size=self.block_size,
            eos_token_ids=self.eos_token_ids,
            bos_token_id=self.bos_token_id if self.bos_token_id is not None else -1,
            default_max_tokens=self.limits.default_max_tokens,
            max_prompt_tokens=self.limits.max_prompt_tokens,
        )

    async def GetClusterStatus(self, request, context):
        return status_to_proto(await self.router.cluster_status(), self.model_name)


def status_to_proto(s: dict, model_name: str) -> pb.ClusterStatus:
    """FrontEnd.cluster_status() (the scheduler's view, this front end's numbers) as a message."""
    status = pb.ClusterStatus(
        model=model_name,
        requests_in_flight=int(s.get("requests_in_flight", 0)),
        requests_total=int(s.get("requests_total", 0)),
        uptime_s=float(s.get("uptime_s", 0.0)),
        mode=s.get("mode", ""),
        deployment=s.get("deployment", ""),
        frontend_id=s.get("frontend_id", ""),
    )
    if s.get("migrations"):
        status.migrations.CopyFrom(migration_stats_to_proto(s["migrations"]))
    routing = s.get("routing")
    if routing:
        status.routing.CopyFrom(pb.RoutingStats(
            policy=routing.get("policy", ""), sessions=int(routing.get("sessions", 0)),
            decisions={f"{role}/{reason}": int(n) for role, by_reason in routing.get("decisions", {}).items()
                       for reason, n in by_reason.items()},
            expected_cached_tokens={k: int(v) for k, v in routing.get("expected_cached_tokens", {}).items()}))
    sched = s.get("scheduler") or {}
    status.scheduler.CopyFrom(pb.SchedulerStatus(state=sched.get("state", "serving"),
                                                 uptime_s=float(sched.get("uptime_s", 0.0)),
                                                 restarts=int(sched.get("restarts", 0)),
                                                 pid=int(sched.get("pid", 0))))
    for f in s.get("frontends", ()):
        status.frontends.add(frontend_id=f["frontend_id"], address=str(f.get("address", "")),
                             pid=int(f.get("pid", 0)), node_id=str(f.get("node_id", "")), state=f["state"],
                             requests_in_flight=int(f.get("requests_in_flight", 0)),
                             requests_total=int(f.get("requests_total", 0)),
                             uptime_s=float(f.get("uptime_s", 0.0)), last_seen_s=float(f.get("last_seen_s", 0.0)))
    for inst in s.get("instances", ()):
        info, load = inst["info"], inst.get("load")
        entry = status.instances.add(
            instance_id=info.instance_id, role=info.role, state=inst["state"],
            node_id=info.node_id, requests_served=int(inst.get("requests_served", 0)),
            death_reason=inst.get("death_reason") or "", restarts=int(inst.get("restarts", 0)), pid=info.pid,
            tensor_parallel_size=info.tensor_parallel_size, rank_pids=list(info.rank_pids),
        )
        if load is not None:
            entry.tokens_generated = load.tokens_generated
            entry.prompt_tokens_computed = load.prompt_tokens_computed
            if load.spec:
                entry.spec_decode.CopyFrom(pb.SpecDecodeStats(
                    **{k: v for k, v in load.spec.items() if k in _SPEC_FIELDS and v is not None}))
            if load.prefix:
                queried = int(load.prefix.get("query_tokens", 0))
                hits = int(load.prefix.get("hit_tokens_device", 0))
                entry.prefix_cache.CopyFrom(pb.PrefixCacheStats(
                    query_tokens=queried, hit_tokens_device=hits, hit_rate=hits / queried if queried else 0.0,
                    cached_blocks=int(load.prefix.get("cached_blocks", 0))))
            if load.kv:
                entry.kv_transfer.CopyFrom(pb.KVTransferStats(
                    **{k: v for k, v in load.kv.items() if k in _KV_FIELDS}))
            entry.load.CopyFrom(pb.InstanceLoad(
                num_total_blocks=load.num_total_blocks, num_free_blocks=load.num_free_blocks,
                num_running=load.num_running, num_waiting=load.num_waiting,
                queued_prompt_tokens=load.queued_prompt_tokens, kv_usage=load.kv_usage,
            ))
    return status


async def start_grpc_server(servicer: DisaggServeServicer, host: str, port: int, *,
                            max_concurrent_rpcs: int | None = None, tls: tuple[str, str] | None = None,
                            auth_token: str | None = None, reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:
    """Starts the server; returns it and the bound port (port 0 picks a free one)."""
    interceptors = [BearerTokenInterceptor(auth_token)] if auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        # A hard backstop past the router's own admission control: gRPC itself answers
        # RESOURCE_EXHAUSTED instead of buffering without bound.
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        # SO_REUSEPORT only when asked: several front ends on one node then share one port
        # (the kernel spreads connections over them); off, a taken port fails loudly.
        options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 1 if reuse_port else 0)],
    )
    add_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, server_credentials(*tls)) if tls
             else server.add_insecure_port(address))
    if bound == 0:
        raise RuntimeError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    servicer.health = health_servicer
    return server, bound
