"""Least-loaded dispatch over the ready instances of a pool (pure logic, no engines)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    # Requests the router has placed there and not yet seen end: exact, unlike a lagging report.
    in_flight: int
    num_free_blocks: int
    queued_prompt_tokens: int = 0


def least_loaded(candidates: list[Candidate]) -> str | None:
    """Fewest in-flight requests, then fewest queued prompt tokens, then most free KV blocks;
    ties go to the smallest instance id so dispatch is deterministic."""
    if not candidates:
        return None
    best = min(
        candidates,
        key=lambda c: (c.in_flight, c.queued_prompt_tokens, -c.num_free_blocks, c.instance_id),
    )
    return best.instance_id
