from __future__ import annotations

import socket

import pytest

from tests.deploy import support


@pytest.fixture(scope="session")
def crds() -> dict[str, dict]:
    """The KubeRay CRDs by kind; a clear failure (not a skip) when shared/ is not there."""
    found = support.crds_by_kind()
    if not support.CRD_DIR.is_dir() or "RayCluster" not in found:
        pytest.fail(support.crd_missing_message(), pytrace=False)
    return found


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test: validation must work offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during offline validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
