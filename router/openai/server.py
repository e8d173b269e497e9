"""Serves an ASGI app with uvicorn inside the caller's running event loop (the one the gRPC
server and the router live in), as a task: no second loop, no thread, no HTTP parsing of ours.

The socket is bound here, so a port already in use is a clear error for the caller (uvicorn
itself would exit the process), and port 0 picks a free port. The launcher owns SIGINT and
SIGTERM, so the embedded server installs no signal handlers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass

import uvicorn


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn would take SIGINT/SIGTERM from the launcher (and re-raise them on exit).
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot bind the HTTP port {host}:{port}: {exc}") from exc
    return sock


@dataclass
class HttpServer:
    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stops accepting, gives open responses `grace_s` to end, then cancels them (which
        aborts their requests)."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace_s + 5.0)
        except asyncio.TimeoutError:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def start_http_server(app, host: str, port: int, *, tls: tuple[str, str] | None = None,
                            limit_concurrency: int | None = None, grace_s: float = 5.0,
                            startup_timeout_s: float = 30.0) -> HttpServer:
    """Starts serving `app`; returns once it accepts connections."""
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host=host, port=bound, lifespan="off", log_config=None, access_log=False, log_level="warning",
        ws="none", limit_concurrency=limit_concurrency, timeout_graceful_shutdown=grace_s,
        ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http-{bound}")
    deadline = time.monotonic() + startup_timeout_s
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what failed
                raise RuntimeError("the HTTP server stopped during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {startup_timeout_s:.0f}s")
            await asyncio.sleep(0.01)
    except BaseException:
        task.cancel()
        sock.close()
        raise
    return HttpServer(server, task, bound)
