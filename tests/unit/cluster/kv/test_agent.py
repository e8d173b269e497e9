"""The KV agent's bookkeeping with a fake transport (no engines)."""

import threading
import time

import torch

from cluster.kv.agent import KVTransferAgent
from cluster.kv.transports.base import KVTransport, SourceRef, TransferError

NUM_BLOCKS, BLOCK = 8, 4


def make_agent(transport=None, **kw):
    agent = KVTransferAgent("a", transport or FakeTransport(), **kw)
    agent.register_kv_caches({"l0": torch.arange(NUM_BLOCKS * 6, dtype=torch.float32).reshape(NUM_BLOCKS, 6)},
                             NUM_BLOCKS, BLOCK)
    return agent


class FakeTransport(KVTransport):
    name = "fake"

    def __init__(self, fail=False, delay=0.0):
        self.fail, self.delay, self.calls = fail, delay, []

    def fetch(self, source, transfer_id, cache, block_ids, timeout_s):
        self.calls.append((transfer_id, list(block_ids)))
        time.sleep(self.delay)
        if self.fail:
            raise TransferError("peer died")
        return len(block_ids) * cache.bytes_per_block


class FakeActor:
    def __init__(self):
        self.released = []
        outer = self

        class _M:
            def remote(self, transfer_id):
                outer.released.append(transfer_id)

        self.kv_release = _M()


def wait_finished(agent, timeout=5.0):
    deadline = time.monotonic() + timeout
    got = (set(), set(), set())
    while time.monotonic() < deadline:
        s, r, f = agent.take_finished()
        got = (got[0] | s, got[1] | r, got[2] | f)
        if got[1]:
            return got
        time.sleep(0.01)
    return got


def test_hold_export_release():
    agent = make_agent()
    agent.hold("t1", "t1-internal", [5, 2, 7, 3], num_tokens=9)  # 9 tokens -> 3 blocks
    assert agent.held_blocks("t1") == [5, 2, 7]
    payload = agent.export("t1")
    assert len(payload["layers"]) == 1 and payload["layers"][0][2] == (3, 6)
    assert agent.take_finished() == (set(), set(), set())
    assert agent.release("t1") is True
    assert agent.release("t1") is False  # idempotent
    assert agent.take_finished()[0] == {"t1-internal"}
    assert agent.export("t1") is None


def test_unfetched_hold_expires():
    agent = make_agent(hold_timeout_s=0.05)
    agent.hold("t1", "i1", [1], 3)
    time.sleep(0.1)
    assert agent.expire_holds() == 1
    assert agent.take_finished()[0] == {"i1"} and agent.stats.expired_holds == 1


def test_load_success_reports_finished_and_releases_source():
    transport, source = FakeTransport(), FakeActor()
    agent = make_agent(transport)
    woke = threading.Event()
    agent.on_event = woke.set
    agent.expect("t1", SourceRef("p0", source), num_tokens=5)
    assert agent.expected_tokens("t1") == 5
    agent.start_load("t1", "t1-x", [6, 1, 4])
    _, recving, failed = wait_finished(agent)
    assert recving == {"t1-x"} and failed == set()
    assert transport.calls == [("t1", [6, 1])]  # 5 tokens -> 2 blocks
    assert source.released == ["t1"] and woke.is_set()
    assert agent.stats.transfers_in == 1 and agent.stats.bytes_received == 2 * 6 * 4


def test_load_failure_is_reported_as_failed_and_finished():
    source = FakeActor()
    agent = make_agent(FakeTransport(fail=True))
    agent.expect("t1", SourceRef("p0", source), 4)
    agent.start_load("t1", "t1-x", [0])
    _, recving, failed = wait_finished(agent)
    assert recving == {"t1-x"} and failed == {"t1-x"}
    assert agent.stats.failures == 1 and source.released == ["t1"]


def test_load_without_expectation_fails_closed():
    agent = make_agent()
    agent.start_load("unknown", "u-x", [0])
    assert agent.take_finished() == (set(), {"u-x"}, {"u-x"})


def test_forget_before_load_releases_source():
    source = FakeActor()
    agent = make_agent()
    agent.expect("t1", SourceRef("p0", source), 4)
    agent.forget("t1")
    assert source.released == ["t1"] and agent.expected_tokens("t1") == 0
