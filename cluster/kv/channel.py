"""The KV side channel: a small TCP request/reply protocol between engine ranks.

Every rank of every engine that moves KV runs one `RankServer` (a listening socket and a thread
per peer connection). A destination rank sends it a JSON request ("export these held blocks",
"join an NCCL pair", ...), gets a JSON reply, and, for byte streams, the raw bytes after it.
It replaces a Ray task per transfer (~2 ms) with one round trip on a kept-open connection, and
it reaches vLLM's rank processes, which are not Ray workers.

Frames: 4-byte big-endian header length, the UTF-8 JSON header, then `header["nbytes"]` raw
bytes when the header says so. JSON, not pickle: a peer can ask for data, never run code.
Every call has a deadline (socket timeouts); a connection that failed is dropped and redialled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 16 << 20


class ChannelError(RuntimeError):
    """The peer answered with an error, or the connection broke."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]


def send_frame(sock: socket.socket, header: dict, payload=None) -> None:
    """Sends a header and, when given, the raw payload (any buffer; sent without a copy)."""
    data = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)
    if payload is not None:
        sock.sendall(payload)


def recv_header(sock: socket.socket) -> dict:
    size = bytearray(_LEN.size)
    _recv_exact(sock, memoryview(size))
    (n,) = _LEN.unpack(size)
    if n > MAX_HEADER_BYTES:
        raise ConnectionError(f"header of {n} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    data = bytearray(n)
    _recv_exact(sock, memoryview(data))
    return json.loads(data)


def recv_payload(sock: socket.socket, into: memoryview) -> None:
    _recv_exact(sock, into)


# A handler gets the request header and the connection's socket (to stream a payload after its
# reply, or to read one); it returns the reply header (sent by the server) or None when it sent
# the reply itself.
Handler = Callable[[dict, socket.socket], "dict | None"]


class RankServer:
    """Serves one rank's side channel on (host, port 0: any free port)."""

    def __init__(self, handlers: dict[str, Handler], host: str = "127.0.0.1", port: int = 0,
                 name: str = "kv-channel"):
        self.handlers = handlers
        self._listener = socket.create_server((host, port), backlog=64)
        self.endpoint = Endpoint(host, self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._name = name
        threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name=f"{self._name}-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while not self._closed.is_set():
                try:
                    request = recv_header(conn)
                except (OSError, ValueError):
                    return  # the peer left, or sent garbage: drop the connection
                handler = self.handlers.get(request.get("op"))
                try:
                    if handler is None:
                        raise ChannelError(f"unknown request {request.get('op')!r}")
                    reply = handler(request, conn)
                except Exception as exc:  # noqa: BLE001 - any failure goes back to the asking peer
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                if reply is not None and not request.get("noreply"):
                    try:
                        send_frame(conn, reply)
                    except OSError:
                        return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


class RankClient:
    """A kept-open connection to one peer rank; one call at a time (callers hold `lock` across
    a call and its payload)."""

    def __init__(self, endpoint: Endpoint, connect_timeout_s: float = 5.0):
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.lock = threading.Lock()
        self._sock: socket.socket | None = None

    def _connected(self, timeout_s: float) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((self.endpoint.host, self.endpoint.port),
                                            timeout=min(timeout_s, self.connect_timeout_s))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        self._sock.settimeout(max(timeout_s, 0.001))
        return self._sock

    def call(self, request: dict, timeout_s: float, payload=None, reply_into: Callable | None = None) -> dict:
        """Sends `request` (and a payload), returns the reply header. `reply_into(header)`, when
        given, returns a writable buffer the reply's payload is read into. Raises TimeoutError
        past the deadline and ChannelError for a peer error or a broken connection."""
        with self._failures("did not answer %s within %.1fs", request.get("op"), timeout_s):
            sock = self._connected(timeout_s)
            send_frame(sock, request, payload)
            return self._read_frame(sock, reply_into)

    def recv(self, timeout_s: float, into: Callable | None = None) -> dict:
        """The next frame of a streamed reply (after `call`); `into(header)` as for `call`."""
        with self._failures("stopped streaming within %.1fs", timeout_s):
            return self._read_frame(self._connected(timeout_s), into)

    def send(self, request: dict, timeout_s: float, payload=None) -> None:
        """A request (and payload) the peer does not answer (`noreply`): no round trip."""
        with self._failures("did not take %s within %.1fs", request.get("op"), timeout_s):
            send_frame(self._connected(timeout_s), {**request, "noreply": True}, payload)

    def _read_frame(self, sock: socket.socket, into: Callable | None) -> dict:
        header = recv_header(sock)
        if "error" in header:
            raise ChannelError(f"{self.endpoint}: {header['error']}")
        if header.get("nbytes") and into is not None:
            recv_payload(sock, memoryview(into(header)).cast("B"))
        return header

    @contextlib.contextmanager
    def _failures(self, timed_out: str, *args):
        """A failed exchange leaves the stream mid-frame: close the connection (the next call
        reconnects), and say what happened: TimeoutError past the deadline (`timed_out % args`,
        formatted only then: this wraps every send of a layer push), else ChannelError."""
        try:
            yield
        except TimeoutError as exc:
            self.close()
            raise TimeoutError(f"{self.endpoint} {timed_out % args}") from exc
        except (OSError, ValueError) as exc:
            self.close()
            raise ChannelError(f"{self.endpoint}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class ClientPool:
    """One RankClient per peer endpoint, shared by a rank's loader threads."""

    def __init__(self):
        self._clients: dict[Endpoint, RankClient] = {}
        self._lock = threading.Lock()

    def get(self, endpoint: Endpoint) -> RankClient:
        with self._lock:
            client = self._clients.get(endpoint)
            if client is None:
                client = self._clients[endpoint] = RankClient(endpoint)
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
