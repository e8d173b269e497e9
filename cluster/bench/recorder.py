"""One streamed request through the gRPC front end, recorded as the client saw it.

The one place that turns a Generate stream into a RequestRecord (send, end and done times, the
time and token count of each token-carrying message, usage, finish reason, the instances that
served it, and how it failed). The load generator, the migration studies and the migration
tests all stream through it; the latter two also read the token ids and the final message, and
wait for a stream to reach a number of tokens before acting on it.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from cluster.bench.records import RequestRecord
from cluster.client import FINISH_REASONS, AsyncClient
from proto import disagg_pb2 as pb


class StreamEnded(RuntimeError):
    """The stream ended before the number of tokens being waited for had arrived."""


class StreamRecorder:
    """Streams one request, starting at construction; `task` ends with the recorder itself.

    Times in `record` are seconds from `t0` (a time.perf_counter() reading; default: now), so
    requests that share a t0 share a clock. A failed call is recorded in `record.status` and
    `record.error`, never raised: in a benchmark a failure still counts against the run.
    Greedy with EOS ignored unless told otherwise, so the output is reproducible and exactly
    max_tokens long.
    """

    def __init__(self, client: AsyncClient, prompt: str | list[int], max_tokens: int, *,
                 request_id: str = "", priority: int = 0, temperature: float = 0.0,
                 ignore_eos: bool = True, t0: float | None = None,
                 record: RequestRecord | None = None):
        self.request_id = request_id
        self.t0 = time.perf_counter() if t0 is None else t0
        self.record = record if record is not None else RequestRecord(0, len(prompt), max_tokens)
        self.tokens: list[int] = []
        self.messages = 0  # every message received, token-carrying or not
        self.final: pb.GenerateResponse | None = None  # the finished message (usage, served_by)
        self.finished_at: float | None = None  # time.monotonic() when `final` arrived
        self._ended = False
        self._progress = asyncio.Event()
        options = {"max_tokens": max_tokens, "temperature": temperature, "ignore_eos": ignore_eos,
                   "request_id": request_id, "priority": priority}
        self.task = asyncio.ensure_future(self._run(client, prompt, options))

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    async def _run(self, client: AsyncClient, prompt, options: dict) -> StreamRecorder:
        record = self.record
        record.send_s = self._now()
        try:
            async for msg in client.stream(prompt, **options):
                self._receive(msg, self._now())
            record.status = final_status(record)
        except grpc.aio.AioRpcError as exc:
            record.status, record.error = exc.code().name, exc.details() or ""
        # A client-side failure still counts against the run.
        except Exception as exc:  # noqa: BLE001
            record.status, record.error = f"CLIENT_{type(exc).__name__}", str(exc)
        finally:
            record.done_s = self._now()
            self._ended = True
            self._progress.set()  # wakes reach(), which then sees that the stream has ended
        return self

    def _receive(self, msg: pb.GenerateResponse, now: float) -> None:
        record = self.record
        self.messages += 1
        if msg.token_ids:
            record.chunk_times.append(now)
            record.chunk_tokens.append(len(msg.token_ids))
            self.tokens.extend(msg.token_ids)
        if msg.finished:
            self.final = msg
            self.finished_at = time.monotonic()
            record.end_s = now
            record.finish_reason = FINISH_REASONS.get(msg.finish_reason)
            record.prompt_tokens = msg.usage.prompt_tokens
            record.output_tokens = msg.usage.completion_tokens
            record.served_by = list(msg.served_by)
        self._progress.set()

    async def reach(self, n: int, timeout_s: float = 60.0) -> None:
        """Waits until at least n tokens have arrived. StreamEnded if the stream ends first,
        TimeoutError after timeout_s."""

        async def wait() -> None:
            while len(self.tokens) < n:
                if self._ended:
                    raise StreamEnded(f"{self!r} ended before reaching {n} tokens")
                self._progress.clear()
                await self._progress.wait()

        await asyncio.wait_for(wait(), timeout_s)

    def __repr__(self) -> str:
        # Shown by failed test assertions on a recorder's attributes: say how the call went.
        record = self.record
        error = f": {record.error}" if record.error else ""
        return (f"<StreamRecorder {self.request_id or '(no id)'}: {len(self.tokens)} tokens, "
                f"{self.messages} messages, {record.status}{error}>")


def final_status(record: RequestRecord) -> str:
    """The status of a call that closed without an RPC error."""
    if record.end_s is None:
        return "INCOMPLETE_STREAM"  # stream closed OK without its final message
    if record.finish_reason == "abort":
        return "FINISH_ABORT"
    return "OK"
