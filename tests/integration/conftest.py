"""Real parts: the demo models, a `disagg-serve up` process (real Ray, real vLLM CPU engines,
real gRPC over loopback) and a plain in-process vLLM engine as the reference."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MAX_MODEL_LEN = 1024
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`disagg-serve up ...` in a child process; ready once it prints `READY <port>`."""

    def __init__(self, args: list[str], startup_timeout_s: float = 300.0):
        self.metrics_port = free_port()
        cmd = [sys.executable, "-m", "cluster.entrypoints.cli", "up", "--port", "0", "--host", "127.0.0.1",
               "--metrics-port", str(self.metrics_port), *args]
        self.log_lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._collect, args=(self.proc.stderr,), daemon=True).start()
        self.port = self._wait_ready(startup_timeout_s)
        self.address = f"127.0.0.1:{self.port}"

    def _collect(self, stream) -> None:
        for line in stream:
            self.log_lines.append(line)

    def _wait_ready(self, timeout_s: float) -> int:
        result: list[int] = []

        def read_stdout():
            for line in self.proc.stdout:
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

    def stop(self, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)


@pytest.fixture(scope="session")
def demo_models() -> Path:
    from cluster.models.demo import build_demo_models

    return build_demo_models()


@pytest.fixture(scope="session")
def target_model(demo_models) -> str:
    return str(demo_models / "target")


ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", "0.25"]


def run_server(args):
    server = ServerProcess(args)
    yield server
    rc = server.stop()
    assert rc == 0, "server did not shut down cleanly:\n" + "".join(server.log_lines[-40:])


@pytest.fixture(scope="module")
def colocated_server(target_model):
    yield from run_server(["--colocated", "2", "--model", target_model, *ENGINE_ARGS])


@pytest.fixture(scope="module")
def disagg_server(target_model):
    yield from run_server(["--prefill", "1", "--decode", "1", "--model", target_model, *ENGINE_ARGS,
                           "--kv-transfer-timeout", "20", "--kv-hold-timeout", "30"])


@pytest.fixture(scope="session")
def reference_llm(target_model):
    """A single plain vLLM engine on the same model: the ground truth for greedy outputs."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(model=target_model, max_model_len=MAX_MODEL_LEN, dtype="float32", enforce_eager=True,
               kv_cache_memory_bytes=256 << 20, seed=0)


def reference_greedy(llm, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture
def client(colocated_server):
    from cluster.client import Client

    with Client(colocated_server.address, timeout=300) as c:
        yield c


@pytest.fixture
def disagg_client(disagg_server):
    from cluster.client import Client

    with Client(disagg_server.address, timeout=300) as c:
        yield c


def wait_idle(client, timeout_s: float = 60.0):
    """Cluster status once every instance is idle with all KV blocks free (or fail)."""
    from cluster.client import status_to_dict

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
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = tokenizer.encode(text[offset:offset + 8 * n + 1000], add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="session")
def tokenizer(target_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target_model)


def greedy_concurrently(address: str, prompts, max_tokens) -> list:
    """Sends every prompt at once over one channel; greedy Completions in prompt order."""
    import asyncio

    from cluster.client import AsyncClient

    async def run_all():
        client = AsyncClient(address)
        try:
            return await asyncio.gather(*[client.generate(p, max_tokens=m, temperature=0.0)
                                          for p, m in zip(prompts, max_tokens)])
        finally:
            await client.close()

    return asyncio.run(run_all())
