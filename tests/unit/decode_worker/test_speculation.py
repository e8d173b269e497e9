"""SpecConfig (the CLI/YAML spec section) -> the decode workers' TetrisConfig."""

from __future__ import annotations

import pytest

from cluster.config import SpecConfig
from decode_worker.speculation import tetris_config


def test_budget_mode_defaults_to_goodput_and_reaches_the_policy():
    assert SpecConfig().budget == "goodput"
    assert tetris_config(SpecConfig(draft_model="d", k=2, extra=3)).budget == "goodput"
    config = tetris_config(SpecConfig(draft_model="d", k=2, extra=3, budget="fixed", tetris=False, capacity=5))
    assert (config.budget, config.enabled, config.capacity, config.num_speculative_tokens) == ("fixed", False, 5, 5)
    with pytest.raises(ValueError, match="spec budget"):
        SpecConfig(budget="sometimes")
