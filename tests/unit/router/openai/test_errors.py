"""RequestError's one status, as gRPC and HTTP clients see it."""

from __future__ import annotations

import grpc
import pytest

from router.errors import RequestError
from router.openai.errors import request_error_body, request_error_headers


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.NOT_FOUND, 404), (grpc.StatusCode.ALREADY_EXISTS, 409),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
])
def test_each_code_has_the_http_status_a_client_expects(code, status):
    assert RequestError(code, "m").http_status == status


def test_error_bodies_and_retry_headers():
    busy = RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_after_ms=100)
    assert request_error_body(busy) == {"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                                                  "code": "rate_limit_exceeded"}}
    # Retry-After is whole seconds, at least 1; the precise hint rides along for the OpenAI client.
    assert request_error_headers(busy) == {"Retry-After": "1", "retry-after-ms": "100"}
    assert request_error_headers(RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "b", 2500))["Retry-After"] == "3"
    assert request_error_headers(RequestError.invalid("x")) == {}
    bad = request_error_body(RequestError.invalid("max_tokens must be >= 1, got 0", "max_tokens"))
    assert bad["error"]["type"] == "invalid_request_error" and bad["error"]["param"] == "max_tokens"
    down = request_error_body(RequestError(grpc.StatusCode.UNAVAILABLE, "no instance"))
    assert down["error"]["type"] == "server_error"
    unknown = request_error_body(RequestError(grpc.StatusCode.NOT_FOUND, "no model", param="model"))
    assert unknown["error"]["code"] == "model_not_found"
