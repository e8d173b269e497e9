"""What the integration tests share: a `disagg-serve up` child process, the plain-vLLM
reference, corpus prompts, and the checks every path runs (greedy equality, an idle cluster)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

from cluster.client import AsyncClient, status_to_dict

MAX_MODEL_LEN = 1024


REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`disagg-serve up ...` in a child process; ready once it prints `READY <port>`. Every
    front end it runs is in `frontends`: (front end id, gRPC port, pid), from its
    `FRONTEND ...` lines; `ready_s` is how long it took to serve."""

    def __init__(self, args: list[str], startup_timeout_s: float = 300.0, env: dict | None = None):
        # Port 0 everywhere: the server binds free ports and prints them (a port picked here and
        # bound there later could be taken in between, e.g. by one of Ray's workers).
        self.metrics_port = self.http_port = 0  # the OpenAI-compatible API, on every test server
        cmd = [sys.executable, "-m", "cluster.entrypoints.cli", "up", "--port", "0", "--host", "127.0.0.1",
               "--metrics-port", "0", "--http-port", "0", *args]
        self.log_lines: list[str] = []
        self.frontends: list[tuple[str, int, int]] = []
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, env=env)
        threading.Thread(target=self._collect, args=(self.proc.stderr,), daemon=True).start()
        self.port = self._wait_ready(startup_timeout_s)
        self.ready_s = time.monotonic() - started
        self.address = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    def _collect(self, stream) -> None:
        for line in stream:
            self.log_lines.append(line)

    def _wait_ready(self, timeout_s: float) -> int:
        result: list[int] = []

        def read_stdout():
            for line in self.proc.stdout:
                if line.startswith("FRONTEND "):
                    _, fid, port, pid = line.split()
                    self.frontends.append((fid, int(port), int(pid)))
                if line.startswith("HTTP "):
                    self.http_port = int(line.split()[1])
                if line.startswith("METRICS "):
                    self.metrics_port = int(line.split()[1])
                if line.startswith("READY "):
                    result.append(int(line.split()[1]))
                    return

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not result:
            self.kill()
            raise RuntimeError("server did not become ready:\n" + "".join(self.log_lines[-60:]))
        return result[0]

    def metrics_text(self, timeout_s: float = 30.0) -> str:
        """The front end's Prometheus exposition, as text."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=timeout_s).read().decode()

    def stop(self, timeout_s: float = 150.0) -> int:
        """SIGINT, then the exit status. The server bounds its own shutdown (engines asked to
        stop for 10 s each, then killed; Ray's local head stopped); `timeout_s` is above that."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server still running {timeout_s}s after SIGINT:\n"
                                 + "".join(self.log_lines[-60:])) from None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)


ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", "0.25"]


def run_server(args):
    """A module fixture's body: the server while the tests run, a clean shutdown after."""
    server = ServerProcess(args)
    yield server
    began = time.monotonic()
    rc = server.stop()
    # Shown with `pytest -s`: how long the shutdown took and what it said about each step.
    print(f"\nserver shut down in {time.monotonic() - began:.1f}s:\n"
          + "".join(line for line in server.log_lines[-12:] if "[disagg-serve]" in line))
    assert rc == 0, "server did not shut down cleanly:\n" + "".join(server.log_lines[-40:])


def reference_greedy(llm, prompts: list[list[int]], max_tokens: list[int],
                     ignore_eos: bool = False) -> list[list[int]]:
    """The plain engine's greedy tokens for each prompt (the ground truth of every path)."""
    from vllm import SamplingParams  # vLLM is heavy: only tests that build the reference load it

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=ignore_eos) for n in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def wait_idle(client, timeout_s: float = 60.0):
    """Cluster status once every instance is idle with all KV blocks free (or fail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = status_to_dict(client.cluster_status())
        insts = status["instances"]
        if status["requests_in_flight"] == 0 and all("load" in i for i in insts) and all(
                int(i["load"]["num_free_blocks"]) == int(i["load"]["num_total_blocks"])
                and int(i["load"]["num_running"]) == 0 and int(i["load"]["num_waiting"]) == 0
                and int(i.get("kv_transfer", {}).get("blocks_held", 0)) == 0 for i in insts):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster not idle after {timeout_s}s: {status}")
        time.sleep(0.2)


def corpus_token_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    """`n` tokens of real text (the standard library's argparse source)."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = tokenizer.encode(text[offset:offset + 8 * n + 1000], add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


def greedy_concurrently(address: str, prompts, max_tokens) -> list:
    """Sends every prompt at once over one channel; greedy Completions in prompt order."""
    async def run_all():
        client = AsyncClient(address)
        try:
            return await asyncio.gather(*[client.generate(p, max_tokens=m, temperature=0.0)
                                          for p, m in zip(prompts, max_tokens, strict=True)])
        finally:
            await client.close()

    return asyncio.run(run_all())


def assert_greedy_equals_reference(address: str, llm, prompts, max_tokens, what: str = "") -> list:
    """Sends every prompt at once (greedy) and checks each output token for token against the
    plain vLLM engine `llm`; returns the Completions for further checks."""
    expected = reference_greedy(llm, prompts, max_tokens)
    got = greedy_concurrently(address, prompts, max_tokens)
    for prompt, completion, want in zip(prompts, got, expected, strict=True):
        assert completion.token_ids == want, f"prompt of {len(prompt)} tokens diverged{what}"
    return got
