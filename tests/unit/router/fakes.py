"""Fakes the router's unit tests share (no Ray): an actor handle whose method calls are
recorded and answered by scripted handlers."""

from __future__ import annotations

import inspect


class FakeActor:
    """`actor.method.remote(*args)` records (method, args) at once and returns a coroutine
    that runs handlers[method](*args) (sync or async; may raise) when awaited."""

    def __init__(self, name: str):
        self.name = name
        self.calls: list[tuple[str, tuple]] = []
        self.handlers: dict = {}

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        actor = self

        class _Method:
            @staticmethod
            def remote(*args):
                actor.calls.append((method, args))
                handler = actor.handlers.get(method)

                async def run():
                    if handler is None:
                        return None
                    out = handler(*args)
                    if inspect.isawaitable(out):
                        out = await out
                    return out

                return run()

        return _Method()

    def called(self, method: str) -> list[tuple]:
        return [args for m, args in self.calls if m == method]

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]
