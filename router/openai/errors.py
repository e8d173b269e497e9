"""RequestError as the OpenAI API reports errors: an HTTP status and a JSON body
{"error": {"message", "type", "param", "code"}}, plus Retry-After on 429 (and `retry-after-ms`,
which the official client reads first)."""

from __future__ import annotations

import math

import grpc

from router.errors import RequestError

# OpenAI's error `type` per HTTP status (what its own API and SDKs use).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def _code(exc: RequestError) -> str | None:
    if exc.code == grpc.StatusCode.NOT_FOUND and exc.param == "model":
        return "model_not_found"
    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "rate_limit_exceeded"
    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
        return "invalid_api_key"
    return None


def request_error_body(exc: RequestError) -> dict:
    return error_body(exc.message, exc.http_status, exc.param, _code(exc))


def request_error_headers(exc: RequestError) -> dict[str, str]:
    if exc.retry_after_ms is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after_ms / 1000))),
            "retry-after-ms": str(exc.retry_after_ms)}
