"""An error a request ends with, carrying the gRPC status the client sees."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def invalid(cls, message: str) -> "RequestError":
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message)
