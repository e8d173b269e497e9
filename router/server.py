"""The gRPC front end: DisaggServe service, standard health service and server reflection."""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import disagg_pb2 as pb
from proto import disagg_pb2_grpc as pb_grpc
from router.errors import RequestError
from router.router import Chunk, Router
from router.validation import Limits, validate

log = logging.getLogger(__name__)

_KV_FIELDS = set(pb.KVTransferStats.DESCRIPTOR.fields_by_name)
_SPEC_FIELDS = set(pb.SpecDecodeStats.DESCRIPTOR.fields_by_name)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DisaggServe"].full_name
_FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "abort": pb.FINISH_REASON_ABORT,
}


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


class DisaggServeServicer(pb_grpc.DisaggServeServicer):
    def __init__(self, router: Router, model_name: str, limits: Limits, block_size: int,
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
            validated = validate(request, self._tokenize, self.limits)
            async for chunk in self.router.generate(validated):
                yield chunk_to_proto(chunk)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)

    async def Abort(self, request, context):
        try:
            await self.router.abort(request.request_id)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        return pb.AbortResponse()

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
        r = self.router
        status = pb.ClusterStatus(
            model=self.model_name,
            requests_in_flight=len(r.table),
            requests_total=r.requests_total,
            uptime_s=time.time() - r.started_at,
            mode="disaggregated" if r.disaggregated else "colocated",
        )
        for inst in r.instances.values():
            entry = status.instances.add(
                instance_id=inst.instance_id, role=inst.role, state=inst.state.value,
                node_id=inst.info.node_id, requests_served=inst.requests_served,
                death_reason=inst.death_reason or "",
            )
            if inst.load is not None:
                load = inst.load
                entry.tokens_generated = load.tokens_generated
                entry.prompt_tokens_computed = load.prompt_tokens_computed
                if load.spec:
                    entry.spec_decode.CopyFrom(pb.SpecDecodeStats(
                        **{k: v for k, v in load.spec.items() if k in _SPEC_FIELDS and v is not None}))
                if load.kv:
                    entry.kv_transfer.CopyFrom(pb.KVTransferStats(
                        **{k: v for k, v in load.kv.items() if k in _KV_FIELDS}))
                entry.load.CopyFrom(pb.InstanceLoad(
                    num_total_blocks=load.num_total_blocks, num_free_blocks=load.num_free_blocks,
                    num_running=load.num_running, num_waiting=load.num_waiting,
                    queued_prompt_tokens=load.queued_prompt_tokens, kv_usage=load.kv_usage,
                ))
        return status


async def start_grpc_server(servicer: DisaggServeServicer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Starts the server; returns it and the bound port (port 0 picks a free one)."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_DisaggServeServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    servicer.health = health_servicer
    return server, bound
