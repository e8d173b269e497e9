"""Markers every test directory shares: whatever lives in tests/integration starts real Ray and
vLLM engines, so it is marked `integration` (`make test-unit` deselects it). Tests elsewhere that
start Ray or an engine carry the marker themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)
