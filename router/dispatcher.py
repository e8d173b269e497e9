"""Dispatch over the ready instances of a pool (pure logic, no engines)."""

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


def fewest_queued_prompt_tokens(candidates: list[Candidate]) -> str | None:
    """Prefill dispatch: the instance with the least prompt work ahead of a new request."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.queued_prompt_tokens, c.in_flight, c.instance_id)).instance_id


def freest(candidates: list[Candidate]) -> str | None:
    """Decode dispatch: most free KV blocks per running request (counting the new one)."""
    if not candidates:
        return None
    return min(candidates,
               key=lambda c: (-c.num_free_blocks / (c.in_flight + 1), c.in_flight, c.instance_id)).instance_id
