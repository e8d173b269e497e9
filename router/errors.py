"""An error a request ends with: one canonical status (gRPC's status codes, which Google's API
design also maps onto HTTP), the message the client reads, and the hints a client acts on.

Every front door raises and maps the same error: the gRPC server aborts the call with `code`,
the OpenAI HTTP API answers `http_status` with an error object (router/openai/errors.py)."""

from __future__ import annotations

import grpc

# The HTTP status a client expects for each canonical code (as google.rpc's HTTP mapping).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        # Sent as trailing metadata `retry-after-ms` (gRPC) or Retry-After (HTTP) so clients
        # can back off.
        self.retry_after_ms = retry_after_ms
        # The request field at fault, when one is (OpenAI error objects name it).
        self.param = param

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> RequestError:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message, param=param)
