"""uvicorn embedded in the caller's event loop: a port in use is a clear error, the launcher's
signal handlers stay in place, stop() ends open streams; and the uvicorn API it leans on."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import httpx
import pytest
import uvicorn

from router.openai.app import build_app
from router.openai.backend import ServedModel
from router.openai.server import bind_socket, start_http_server
from tests.unit.router.openai.fakes import LIMITS, CharTokenizer, FakeBackend

MODEL = ServedModel(name="demo", root="/m", limits=LIMITS, tokenizer=CharTokenizer())


def test_uvicorn_api_we_rely_on_is_there():
    # Breaks loudly if uvicorn moves: the embedded server overrides capture_signals, passes
    # its own sockets to serve(), and waits for `started`.
    assert callable(getattr(uvicorn.Server, "capture_signals", None))
    assert "sockets" in uvicorn.Server.serve.__code__.co_varnames
    assert hasattr(uvicorn.Server(uvicorn.Config(app=None)), "started")


def test_port_in_use_is_a_clear_error():
    taken = bind_socket("127.0.0.1", 0)
    taken.listen()  # another server on the port
    try:
        with pytest.raises(RuntimeError, match="cannot bind the HTTP port"):
            asyncio.run(start_http_server(build_app(FakeBackend(), MODEL), "127.0.0.1", taken.getsockname()[1]))
    finally:
        taken.close()


def test_signal_handlers_stay_the_launchers_and_stop_ends_open_streams():
    backend = FakeBackend()
    backend.step_s = 0.2

    def mine(signum, frame):
        pass

    async def go():
        server = await start_http_server(build_app(backend, MODEL), "127.0.0.1", 0, grace_s=0.5)
        during = signal.getsignal(signal.SIGINT)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
            stream = asyncio.ensure_future(http.post("/v1/completions",
                                                     json={"prompt": "x", "max_tokens": 60, "stream": True}))
            while not backend.requests:
                await asyncio.sleep(0.01)
            await server.stop(grace_s=0.5)
            await asyncio.gather(stream, return_exceptions=True)
        return during

    previous = signal.signal(signal.SIGINT, mine)
    try:
        during = asyncio.run(go())
        assert during is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
    assert backend.ended == ["closed"]  # the open stream was ended (its request aborted), not left running


def test_tls_serves_https_with_the_given_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)

    async def go():
        server = await start_http_server(build_app(FakeBackend(), MODEL), "127.0.0.1", 0, tls=(str(cert), str(key)))
        try:
            async with httpx.AsyncClient(verify=str(cert), timeout=10) as https:
                secure = await https.post(f"https://127.0.0.1:{server.port}/v1/completions",
                                          json={"prompt": "ab", "max_tokens": 2})
            async with httpx.AsyncClient(timeout=10) as http:
                with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
                    await http.get(f"http://127.0.0.1:{server.port}/health")
            return secure
        finally:
            await server.stop(grace_s=0.5)

    secure = asyncio.run(go())
    assert secure.status_code == 200 and secure.json()["usage"]["completion_tokens"] == 2
