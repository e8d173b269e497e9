"""A serving process for the studies that compare servers through their HTTP APIs: ours
(`disagg-serve up ... --http-port`) or vLLM's own OpenAI server, started as a child process in
its own session, ready once GET /health answers 200, stopped with SIGINT (then SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class ServerFailed(RuntimeError):
    pass


def vllm_server_command(model: str, port: int, engine_args: list[str]) -> list[str]:
    """vLLM's OpenAI server (the `vllm` console script does not run in this environment)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), *engine_args]


def our_server_command(pools: list[str], model: str, http_port: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cluster.entrypoints.cli", "up", *pools, "--model", model, "--host", "127.0.0.1",
            "--port", "0", "--http-port", str(http_port), *args]


class ServerProcess:
    """A server child process; `base_url` is its HTTP API. Use as a context manager."""

    def __init__(self, name: str, command: list[str], port: int, log_path: str | Path,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 900.0):
        self.name = name
        self.command = command
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")  # closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - self.started_at

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.proc.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise ServerFailed(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a clean shutdown first (ours stops Ray too)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of its session is left (engine processes of a server that hung)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
