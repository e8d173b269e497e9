"""TETRIS as the draft-selection policy of a decode-side engine (decode and colocated workers).

The engine base (cluster/engine/worker.py) builds vLLM's draft-model speculative config from
SpecConfig; this mixin installs the policy over it -- per step a SmartSpec budget
(--spec-budget goodput, the default) or the fixed N * k (--spec-budget fixed), filled by TETRIS
on calibrated draft probabilities (or, with --no-tetris, a uniform length per request) -- and
returns its live stats for the load reports.
"""

from __future__ import annotations

from cluster.config import SpecConfig
from decode_worker.spec_adapter import TetrisStats, install_tetris
from decode_worker.tetris import TetrisConfig


def tetris_config(spec: SpecConfig) -> TetrisConfig:
    return TetrisConfig(k=spec.k, extra=spec.extra, capacity=spec.capacity,
                        min_batch_size=spec.min_batch_size, enabled=spec.tetris, budget=spec.budget)


class TetrisMixin:
    """For an EngineWorker subclass: speculation with TETRIS draft selection."""

    def _install_spec_policy(self) -> TetrisStats:
        return install_tetris(self.loop.engine, tetris_config(self.spec))
