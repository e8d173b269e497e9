"""Background asyncio work shared by the front end and the scheduler: calls whose result nobody
waits for, and tasks kept referenced until they end (asyncio holds only weak references)."""

from __future__ import annotations

import asyncio


def fire(coro) -> None:
    """Runs `coro` (a call with its own deadline) in the background; its outcome is dropped."""
    task = asyncio.get_running_loop().create_task(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def spawn_tracked(coro, tasks: set) -> asyncio.Task:
    """Runs `coro` as a task held in `tasks` until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
