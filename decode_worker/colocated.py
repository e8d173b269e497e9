"""ColocatedWorker: one plain vLLM engine that serves a request from prompt to finish.

It is a decode instance that also runs its own prefills and moves no KV, so it lives with the
decode role and speculates the same way (TETRIS). It is the baseline of every benchmark and a
serving mode of its own (`--colocated N`).
"""

from __future__ import annotations

from cluster.engine.worker import EngineWorker
from decode_worker.speculation import TetrisMixin


class ColocatedWorker(TetrisMixin, EngineWorker):
    role = "colocated"
