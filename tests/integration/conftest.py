"""Real parts: the demo models, a `disagg-serve up` process (real Ray, real vLLM CPU engines,
real gRPC over loopback) and a plain in-process vLLM engine as the reference. The helpers the
tests share are in support.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.client import Client
from cluster.models.demo import build_demo_models
from cluster.models.tokenizer import load_serving_tokenizer
from tests.integration.support import ENGINE_ARGS, MAX_MODEL_LEN, run_server


@pytest.fixture(scope="session")
def demo_models() -> Path:
    return build_demo_models()


@pytest.fixture(scope="session")
def target_model(demo_models) -> str:
    return str(demo_models / "target")


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


@pytest.fixture
def client(colocated_server):
    with Client(colocated_server.address, timeout=300) as c:
        yield c


@pytest.fixture
def disagg_client(disagg_server):
    with Client(disagg_server.address, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def tokenizer(target_model):
    return load_serving_tokenizer(target_model)
