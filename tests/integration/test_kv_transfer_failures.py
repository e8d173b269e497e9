"""KV transfer failure paths, driving real worker actors directly: a source that dies, a source
that never answers (deadline), the `fail` policy, and a destination that never fetches."""

from __future__ import annotations

import time

import pytest
import ray

from cluster.config import EngineConfig, PoolConfig, TransferConfig
from cluster.entrypoints.deployment import spawn_worker
from cluster.protocol import EngineRequest, Sampling
from tests.integration.support import MAX_MODEL_LEN, corpus_token_ids, reference_greedy

TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def local_ray():
    ray.shutdown()
    ray.init(num_cpus=4, resources={"disagg_prefill": 4, "disagg_decode": 4}, include_dashboard=False)
    yield
    ray.shutdown()


def engine_config(target_model, **overrides):
    return EngineConfig(model=target_model, max_model_len=MAX_MODEL_LEN, dtype="float32", cpu_kv_cache_gib=0.25,
                        **overrides)


def start(target_model, role, name, policy="recompute", **engine_overrides):
    pool = PoolConfig(role, 1, num_cpus=0.5, resource=f"disagg_{role}" if role != "colocated" else None)
    actor = spawn_worker(engine_config(target_model, **engine_overrides), pool, name,
                         TransferConfig(timeout_s=TIMEOUT_S, hold_timeout_s=TIMEOUT_S, failure_policy=policy))
    ray.get(actor.info.remote(), timeout=300)
    return actor


@ray.remote(num_cpus=0)
class StuckSource:
    """A source that accepts the call and never answers: the transfer must hit its deadline."""

    def kv_endpoints(self):
        time.sleep(3600)

    def kv_release(self, transfer_id):
        return False


def drive(actor, timeout_s=120.0):
    """Polls until every request finishes; returns {request_id: (tokens, finish_reason, error)}."""
    deadline = time.monotonic() + timeout_s
    out: dict[str, list] = {}
    done: dict[str, tuple] = {}
    while time.monotonic() < deadline:
        batch = ray.get(actor.poll.remote(0.5), timeout=30)
        for d in batch.deltas:
            out.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finished:
                done[d.request_id] = (out[d.request_id], d.finish_reason, d.error)
        if done and batch.load.num_running == 0 and batch.load.num_waiting == 0:
            return done, batch.load
    raise AssertionError("requests did not finish in time")


def prefill(actor, request_id, prompt):
    req = EngineRequest(request_id, tuple(prompt), Sampling(max_tokens=1, temperature=0.0),
                        kv_transfer={"do_remote_decode": True, "transfer_id": request_id})
    ray.get(actor.add_request.remote(req), timeout=30)
    done, load = drive(actor)
    tokens, reason, _ = done[request_id]
    assert reason == "length" and len(tokens) == 1
    return tokens[0], load


def decode_request(request_id, prompt, first, max_tokens):
    return EngineRequest(request_id, tuple(prompt) + (first,), Sampling(max_tokens=max_tokens - 1, temperature=0.0),
                         kv_transfer={"do_remote_prefill": True, "transfer_id": request_id})


def idle_blocks(actor):
    deadline = time.monotonic() + 30
    while True:
        load = ray.get(actor.load.remote(), timeout=30)
        if load.num_free_blocks == load.num_total_blocks or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


def test_source_dies_then_decode_recomputes(local_ray, target_model, reference_llm, tokenizer):
    source, dest = start(target_model, "prefill", "p-dies"), start(target_model, "decode", "d-recompute")
    prompt = corpus_token_ids(tokenizer, 300)
    want = reference_greedy(reference_llm, [prompt], [20])[0]
    first, load = prefill(source, "r1", prompt)
    assert first == want[0] and load.num_free_blocks < load.num_total_blocks  # blocks held for the hand-off
    ray.kill(source)
    ray.get(dest.add_transferred.remote(decode_request("r1", prompt, first, 20), "p-dies", source, len(prompt)))
    done, _ = drive(dest)
    tokens, reason, error = done["r1"]
    assert error is None and [first] + tokens == want
    load = idle_blocks(dest)
    assert load.num_free_blocks == load.num_total_blocks
    assert load.kv["failures"] == 1 and load.prompt_tokens_computed == len(prompt) + 1
    ray.kill(dest)


def test_stuck_source_hits_deadline_then_recompute(local_ray, target_model, reference_llm, tokenizer):
    dest = start(target_model, "decode", "d-deadline")
    prompt = corpus_token_ids(tokenizer, 150, offset=999)
    want = reference_greedy(reference_llm, [prompt], [12])[0]
    stuck = StuckSource.remote()
    started = time.monotonic()
    ray.get(dest.add_transferred.remote(decode_request("r2", prompt, want[0], 12), "stuck", stuck, len(prompt)))
    done, _ = drive(dest)
    elapsed = time.monotonic() - started
    tokens, reason, error = done["r2"]
    assert error is None and [want[0]] + tokens == want
    assert elapsed >= TIMEOUT_S * 0.9  # it waited for the deadline, then recomputed
    assert idle_blocks(dest).kv["failures"] == 1
    ray.kill(dest)


def test_fail_policy_reports_an_error(local_ray, target_model, tokenizer):
    dest = start(target_model, "decode", "d-fail", policy="fail")
    prompt = corpus_token_ids(tokenizer, 64)
    stuck = StuckSource.remote()
    ray.get(dest.add_transferred.remote(decode_request("r3", prompt, 5, 8), "stuck", stuck, len(prompt)))
    done, _ = drive(dest)
    tokens, reason, error = done["r3"]
    assert reason == "error" and tokens == []
    load = idle_blocks(dest)
    assert load.num_free_blocks == load.num_total_blocks
    ray.kill(dest)


def test_unfetched_hold_expires_when_decode_never_comes(local_ray, target_model, tokenizer):
    source = start(target_model, "prefill", "p-orphan")
    _, load = prefill(source, "r4", corpus_token_ids(tokenizer, 200))
    assert load.num_free_blocks < load.num_total_blocks
    time.sleep(TIMEOUT_S + 0.5)
    load = idle_blocks(source)
    assert load.num_free_blocks == load.num_total_blocks and load.kv["expired_holds"] == 1
    ray.kill(source)


def test_orphaned_requests_are_freed_when_nobody_polls(local_ray, target_model):
    """The router died: no poll comes, so the worker aborts its requests and frees their KV."""
    worker = start(target_model, "colocated", "orphan-host", orphan_timeout_s=2.0)
    req = EngineRequest("orphan", tuple(range(10, 300)), Sampling(max_tokens=900, temperature=0.0, ignore_eos=True))
    ray.get(worker.add_request.remote(req), timeout=30)
    time.sleep(0.5)
    busy = ray.get(worker.load.remote(), timeout=30)
    assert busy.num_running == 1 and busy.num_free_blocks < busy.num_total_blocks
    time.sleep(3.0)  # no poll() in the meantime
    load = ray.get(worker.load.remote(), timeout=30)
    assert load.num_running == 0 and load.num_free_blocks == load.num_total_blocks
    assert load.tokens_generated < 900  # stopped early, not decoded into the void
    ray.kill(worker)
