"""Python clients for the DisaggServe gRPC API (blocking and asyncio)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format

from proto import disagg_pb2 as pb
from proto import disagg_pb2_grpc as pb_grpc

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    served_by: list[str] = field(default_factory=list)

    def add(self, msg: pb.GenerateResponse) -> None:
        self.request_id = msg.request_id
        self.text += msg.text
        self.token_ids.extend(msg.token_ids)
        if msg.finished:
            self.finish_reason = FINISH_REASONS.get(msg.finish_reason)
            self.stop_reason = msg.stop_reason
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = msg.usage.completion_tokens
            self.served_by = list(msg.served_by)


def build_request(prompt: str | list[int], *, max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, min_tokens: int | None = None,
                  stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                  seed: int | None = None, ignore_eos: bool = False, priority: int = 0,
                  request_id: str = "", session_id: str = "") -> pb.GenerateRequest:
    request = pb.GenerateRequest(priority=priority, request_id=request_id, session_id=session_id)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    s = request.sampling
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("min_tokens", min_tokens), ("seed", seed)):
        if value is not None:
            setattr(s, name, value)
    s.stop.extend(stop or [])
    s.stop_token_ids.extend(stop_token_ids or [])
    s.ignore_eos = ignore_eos
    return request


def status_to_dict(status: pb.ClusterStatus) -> dict:
    return json_format.MessageToDict(status, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def migration_to_dict(info: pb.MigrationInfo) -> dict:
    """The MigrationRecord.to_dict() form: plain Python numbers, downtime_s None when unknown."""
    d = {f.name: getattr(info, f.name) for f in info.DESCRIPTOR.fields}
    d["downtime_s"] = info.downtime_s if info.HasField("downtime_s") else None
    d["phases_s"] = dict(info.phases_s)
    return d


def drain_to_dict(response: pb.DrainResponse) -> dict:
    return {"instance_id": response.instance_id, "migrated": response.migrated,
            "remaining": response.remaining, "failed": response.failed,
            "migrations": [migration_to_dict(m) for m in response.migrations]}


def _migrate_request(request_id: str, target: str | None) -> pb.MigrateRequest:
    return pb.MigrateRequest(request_id=request_id, target_instance=target or "")


def _drain_request(instance_id: str, timeout_s: float | None, cancel: bool) -> pb.DrainRequest:
    return pb.DrainRequest(instance_id=instance_id, timeout_s=timeout_s or 0.0, cancel=cancel)


# Admin calls wait for the server's own deadlines (migration timeout, drain timeout), so their
# default RPC deadline is generous; a drain with an explicit timeout gets that plus slack.
_MIGRATE_DEADLINE_S = 300.0
_DRAIN_SLACK_S = 60.0


def _drain_deadline(client_timeout: float | None, timeout_s: float | None) -> float | None:
    if timeout_s:
        return max(timeout_s + _DRAIN_SLACK_S, client_timeout or 0.0)
    return client_timeout  # None: the server's default drain timeout bounds the call


def _channel_args(auth_token: str | None, tls_ca: str | None):
    """Credentials for TLS and/or a bearer token (None: plaintext)."""
    if not tls_ca and not auth_token:
        return None
    if tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    else:
        creds = grpc.local_channel_credentials()
    if auth_token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(auth_token))
    return creds


class Client:
    """Blocking client. `stream()` yields GenerateResponse messages; `generate()` collects them.
    `auth_token` sends `authorization: Bearer ...`; `tls_ca` connects over TLS."""

    def __init__(self, server: str = "localhost:50051", timeout: float | None = None, *,
                 auth_token: str | None = None, tls_ca: str | None = None):
        self.address = server
        creds = _channel_args(auth_token, tls_ca)
        self.channel = grpc.secure_channel(server, creds) if creds else grpc.insecure_channel(server)
        self.stub = pb_grpc.DisaggServeStub(self.channel)
        self.timeout = timeout

    def stream(self, prompt, *, timeout: float | None = None, **kwargs):
        return self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout or self.timeout)

    def generate(self, prompt, *, timeout: float | None = None, **kwargs) -> Completion:
        completion = Completion()
        for msg in self.stream(prompt, timeout=timeout, **kwargs):
            completion.add(msg)
        return completion

    def abort(self, request_id: str) -> None:
        self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout or 30)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout or 30)

    def cluster_status(self) -> pb.ClusterStatus:
        return self.stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=self.timeout or 30)

    def migrate(self, request_id: str, target: str | None = None) -> dict:
        """Live-migrates a running request (target None: the router picks); the finished
        migration as a dict (state committed or aborted, with its reason)."""
        response = self.stub.Migrate(_migrate_request(request_id, target),
                                     timeout=self.timeout or _MIGRATE_DEADLINE_S)
        return migration_to_dict(response.migration)

    def drain(self, instance_id: str, timeout_s: float | None = None, cancel: bool = False) -> dict:
        """Drains a decode instance (cancel: undrains it); what moved and what remains."""
        response = self.stub.Drain(_drain_request(instance_id, timeout_s, cancel),
                                   timeout=_drain_deadline(self.timeout, timeout_s))
        return drain_to_dict(response)

    def wait_ready(self, timeout: float = 600.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio client; `stream()` is an async iterator of GenerateResponse messages."""

    def __init__(self, server: str = "localhost:50051", timeout: float | None = None, *,
                 auth_token: str | None = None, tls_ca: str | None = None):
        self.address = server
        creds = _channel_args(auth_token, tls_ca)
        self.channel = (grpc.aio.secure_channel(server, creds) if creds
                        else grpc.aio.insecure_channel(server))
        self.stub = pb_grpc.DisaggServeStub(self.channel)
        self.timeout = timeout

    def stream(self, prompt, *, timeout: float | None = None, **kwargs):
        return self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout or self.timeout)

    async def generate(self, prompt, *, timeout: float | None = None, **kwargs) -> Completion:
        completion = Completion()
        async for msg in self.stream(prompt, timeout=timeout, **kwargs):
            completion.add(msg)
        return completion

    async def abort(self, request_id: str) -> None:
        await self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout or 30)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout or 30)

    async def cluster_status(self) -> pb.ClusterStatus:
        return await self.stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=self.timeout or 30)

    async def migrate(self, request_id: str, target: str | None = None) -> dict:
        response = await self.stub.Migrate(_migrate_request(request_id, target),
                                           timeout=self.timeout or _MIGRATE_DEADLINE_S)
        return migration_to_dict(response.migration)

    async def drain(self, instance_id: str, timeout_s: float | None = None, cancel: bool = False) -> dict:
        response = await self.stub.Drain(_drain_request(instance_id, timeout_s, cancel),
                                         timeout=_drain_deadline(self.timeout, timeout_s))
        return drain_to_dict(response)

    async def close(self) -> None:
        await self.channel.close()
