"""An error a request ends with, carrying the gRPC status the client sees."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        # Sent as trailing metadata `retry-after-ms` so clients can back off.
        self.retry_after_ms = retry_after_ms

    @classmethod
    def invalid(cls, message: str) -> RequestError:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message)
