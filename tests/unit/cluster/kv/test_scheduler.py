"""The scheduler side of the KV connector (KVScheduler) without an engine: what it announces to
the ranks, when vLLM may free held blocks, how loads and pulls are accounted over ranks."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.kv.connector.metadata import PullResult, RankEndpoint, RankReport, SourceSpec
from cluster.kv.connector.scheduler import KVScheduler, SourceRef

BLOCK = 4


class FakeSourceActor:
    """A peer worker actor: answers kv_endpoints, records kv_release."""

    def __init__(self, ranks=()):
        self.released: list[str] = []
        outer = self

        class _Release:
            @staticmethod
            def remote(transfer_id):
                outer.released.append(transfer_id)

        class _Endpoints:
            @staticmethod
            def remote():
                import ray

                return ray.put(list(ranks))

        self.kv_release = _Release()
        self.kv_endpoints = _Endpoints()
        self._actor_id = None


@pytest.fixture
def kv():
    k = KVScheduler("test", "decode-0", timeout_s=5.0, hold_timeout_s=60.0)
    k.bind(BLOCK, tp_size=2)
    woke = []
    k.on_event = lambda: woke.append(1)
    k.woke = woke
    return k


def test_holds_are_announced_once_and_releases_free_only_owned_blocks(kv):
    kv.hold("t", "req-t", [1, 2, 3, 4], 5)  # 5 tokens: 2 blocks
    kv.hold_view("m#s0", "req-m", [7, 8], 8)
    meta = kv.take_metadata()
    assert meta.new_holds == {"t": (1, 2), "m#s0": (7, 8)} and not kv.take_metadata()
    assert kv.stats_snapshot()["blocks_held"] == 2  # a view's blocks still belong to the request
    assert kv.release("m#s0") and kv.release("t") and not kv.release("t")
    meta = kv.take_metadata()
    assert meta.dropped_holds == ["m#s0", "t"]
    assert meta.finished_sending == ["req-t"]  # vLLM must not free a running request's view
    assert kv.num_holds == 0 and len(kv.woke) == 4


def test_a_hold_released_before_announced_is_never_announced(kv):
    kv.hold_blocks("m#tail", "req", [5], 4)
    kv.release("m#tail")
    meta = kv.take_metadata()
    assert meta.new_holds == {} and meta.dropped_holds == [] and meta.finished_sending == ["req"]


def test_release_views_drops_only_that_migrations_views(kv):
    kv.hold_view("m#s0", "i1", [1], 4)
    kv.hold_view("m#s1", "i1", [2], 8)
    kv.hold_view("m2#s0", "i2", [3], 4)
    kv.hold_blocks("m#tail", "i1", [4], 12)
    kv.take_metadata()
    assert kv.release_views("m#") == 2
    meta = kv.take_metadata()
    assert sorted(meta.dropped_holds) == ["m#s0", "m#s1"] and meta.finished_sending == []
    assert kv.release_views("m#") == 0 and kv.num_holds == 2


def test_expired_holds_are_released_and_counted(kv):
    kv.hold_view("m#s0", "i1", [1], 4)
    kv.hold_blocks("m#tail", "i2", [2], 8)
    for hold in kv._holds.values():
        hold.deadline = -1.0
    assert kv.expire_holds() == 2
    assert kv.take_metadata().finished_sending == ["i2"]
    assert kv.stats_snapshot()["expired_holds"] == 2


def test_a_load_goes_to_the_ranks_and_completes_when_vllm_says_every_rank_finished(kv):
    source = FakeSourceActor()
    spec = SourceSpec("prefill-0", ())
    kv._sources[("prefill-0", str(id(source)))] = spec  # resolved earlier (cached per actor)
    kv.expect("t", SourceRef("prefill-0", source), num_tokens=9)
    assert kv.expected_tokens("t") == 9
    kv.start_load("t", "req-internal", [10, 11, 12, 13])
    load = kv.take_metadata().loads[0]
    assert (load.key, load.block_ids, load.source) == ("req-internal", (10, 11, 12), spec)  # 9 tokens: 3 blocks
    assert kv.has_pending_work()
    kv.on_output({"req-internal"}, set(), RankReport(bytes_received=100))
    assert source.released == ["t"] and not kv.has_pending_work()
    stats = kv.stats_snapshot()
    assert stats["transfers_in"] == 1 and stats["bytes_received"] == 100 and stats["failures"] == 0


def test_a_load_nobody_announced_fails_at_the_ranks(kv):
    kv.start_load("unknown", "req", [1])
    load = kv.take_metadata().loads[0]
    assert load.source is None and load.key == "req"


def test_forget_releases_the_source_of_a_load_that_never_started(kv):
    source = FakeSourceActor()
    kv._sources[("prefill-0", str(id(source)))] = SourceSpec("prefill-0", ())
    kv.expect("t", SourceRef("prefill-0", source), 4)
    kv.forget("t")
    assert source.released == ["t"] and kv.expected_tokens("t") == 0


def test_a_pull_waits_for_every_rank_and_fails_if_one_did(kv):
    source = FakeSourceActor()
    kv._sources[("decode-1", str(id(source)))] = SourceSpec("decode-1", ())
    outcome: dict = {}

    def pull():
        try:
            outcome["bytes"] = kv.pull(SourceRef("decode-1", source), "m#s0", [3, 4], timeout_s=5.0)
        except RuntimeError as exc:
            outcome["error"] = str(exc)

    for ranks_ok in ([True, True], [True, False]):
        outcome.clear()
        thread = threading.Thread(target=pull)
        thread.start()
        deadline = time.monotonic() + 5
        while not kv._pulls and time.monotonic() < deadline:
            time.sleep(0.001)
        key = kv.take_metadata().pulls[0].key
        for ok in ranks_ok:  # one report per rank, possibly in different steps
            kv.on_output(set(), set(), RankReport([PullResult(key, ok, 50 if ok else 0, "" if ok else "boom")]))
        thread.join(5)
        if all(ranks_ok):
            assert outcome == {"bytes": 100}
        else:
            assert "boom" in outcome["error"]
    assert source.released == ["m#s0", "m#s0"]  # the source drops its hold either way


def test_endpoints_come_sorted_by_rank(kv):
    ep = [RankEndpoint(r, 2, "h", 1000 + r, 1, 2, 1, ()) for r in (1, 0)]
    kv.set_endpoints({1: ep[0], 0: ep[1]})
    assert [e.rank for e in kv.ranks] == [0, 1]
