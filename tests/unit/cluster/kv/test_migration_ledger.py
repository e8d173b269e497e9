"""MigrationLedger (destination reservations, source stop marks) on a fake block pool. The KV
scheduler's migration holds (stage views vs the owned tail) are in test_scheduler.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import cluster.kv.migration_ledger as km
from cluster.kv.migration_ledger import MigrationLedger, StopMark

BLOCK = 4


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id

    def __repr__(self):
        return f"Block({self.block_id})"


class FakePool:
    """take/free/adopt callbacks over a fixed set of blocks; refuses double frees."""

    def __init__(self, num_blocks: int):
        self.free = [Block(i) for i in range(num_blocks)]
        self.takes: list[int] = []
        self.frees: list[list[int]] = []
        self.adoptions: list[tuple[str, list[int]]] = []

    def take(self, n: int):
        self.takes.append(n)
        if n > len(self.free):
            return None
        out, self.free = self.free[:n], self.free[n:]
        return out

    def give_back(self, blocks):
        blocks = list(blocks)
        free_ids = {b.block_id for b in self.free}
        for b in blocks:
            assert b.block_id not in free_ids, f"double free of block {b.block_id}"
            free_ids.add(b.block_id)
        self.frees.append([b.block_id for b in blocks])
        self.free.extend(blocks)

    def adopt(self, internal_id: str, blocks):
        self.adoptions.append((internal_id, [b.block_id for b in blocks]))

    @property
    def num_free(self) -> int:
        return len(self.free)


def ledger(num_blocks: int = 10, timeout_s: float = 60.0):
    pool = FakePool(num_blocks)
    led = MigrationLedger(timeout_s)
    led.take_blocks, led.free_blocks, led.adopt_blocks = pool.take, pool.give_back, pool.adopt
    return led, pool


# ---------------------------------------------------------------- reservations

def test_reserve_grows_and_never_shrinks():
    led, pool = ledger(10)
    assert led.reserve("m", 3) == [0, 1, 2]
    assert led.reserve("m", 5) == [0, 1, 2, 3, 4]
    assert pool.takes == [3, 2]  # only the growth is taken
    assert led.reserve("m", 4) == [0, 1, 2, 3, 4]  # already enough: nothing taken, nothing freed
    assert led.reserve("m", 5) == [0, 1, 2, 3, 4]
    assert pool.takes == [3, 2] and pool.frees == []
    assert led.block_ids("m") == [0, 1, 2, 3, 4]
    assert led.reserved_blocks() == 5 and pool.num_free == 5


def test_reservations_are_separate_per_migration():
    led, _ = ledger(10)
    assert led.reserve("a", 2) == [0, 1]
    assert led.reserve("b", 3) == [2, 3, 4]
    assert led.reserve("a", 3) == [0, 1, 5]  # in sequence order, whatever the ids
    assert led.reserved_blocks() == 6
    assert led.block_ids("nope") is None


def test_reserve_refreshes_the_deadline(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(km, "time", SimpleNamespace(monotonic=lambda: now[0]))
    led, _ = ledger(10, timeout_s=5.0)
    led.reserve("m", 1)
    assert led._reservations["m"].deadline == 105.0
    now[0] = 103.0
    led.reserve("m", 2)
    assert led._reservations["m"].deadline == 108.0


def test_no_memory_returns_none_and_changes_nothing():
    led, pool = ledger(4)
    assert led.reserve("m", 3) == [0, 1, 2]
    assert led.reserve("m", 6) is None  # needs 3 more, 1 free
    assert led.block_ids("m") == [0, 1, 2] and led.reserved_blocks() == 3
    assert pool.num_free == 1 and pool.frees == []
    assert led.reserve("other", 2) is None
    assert led.block_ids("other") is None  # no empty reservation left behind
    assert led.reserved_blocks() == 3


def test_reserve_after_commit_is_refused():
    led, _ = ledger(10)
    led.reserve("m", 3)
    led.commit("m", 9, BLOCK)
    with pytest.raises(RuntimeError, match="already committed"):
        led.reserve("m", 4)


def test_commit_frees_the_spare_blocks_from_the_end():
    led, pool = ledger(10)
    led.reserve("m", 5)
    led.commit("m", 9, BLOCK)  # 9 tokens: 3 blocks
    assert pool.frees == [[3, 4]]
    assert led.block_ids("m") == [0, 1, 2]
    res = led._reservations["m"]
    assert res.committed and res.num_tokens == 9 and not res.adopted
    assert led.reserved_blocks() == 3 and pool.num_free == 7


def test_commit_exactly_full_frees_nothing():
    led, pool = ledger(10)
    led.reserve("m", 2)
    led.commit("m", 8, BLOCK)
    assert pool.frees == [[]]  # commit hands back an empty spare
    assert led.block_ids("m") == [0, 1]


def test_commit_rejects_too_few_blocks_and_unknown_migrations():
    led, pool = ledger(10)
    led.reserve("m", 2)
    with pytest.raises(RuntimeError, match="need 3 blocks, 2 reserved"):
        led.commit("m", 9, BLOCK)
    res = led._reservations["m"]
    assert not res.committed and res.num_tokens == 0 and led.block_ids("m") == [0, 1]
    assert pool.frees == []
    with pytest.raises(KeyError):
        led.commit("nope", 1, BLOCK)


def test_tokens_for_adopts_exactly_once():
    led, pool = ledger(10)
    led.reserve("m", 4)
    assert led.tokens_for("m", "req-x") == 0  # not committed yet: nothing to adopt
    assert pool.adoptions == []
    led.commit("m", 9, BLOCK)
    assert led.tokens_for("m", "req-x") == 9
    assert pool.adoptions == [("req-x", [0, 1, 2])]
    # vLLM asks again (it could not allocate the rest this step): same answer, no re-adoption.
    assert led.tokens_for("m", "req-x") == 9
    assert led.tokens_for("m", "someone-else") == 0
    assert pool.adoptions == [("req-x", [0, 1, 2])]
    assert led._reservations["m"].adopted_by == "req-x"
    assert led.reserved_blocks() == 0  # vLLM owns them now
    assert led.tokens_for("unknown", "req-x") == 0


def test_running_pops_the_reservation():
    led, pool = ledger(10)
    led.reserve("m", 3)
    led.commit("m", 9, BLOCK)
    led.tokens_for("m", "req-x")
    led.running("m")
    assert led.block_ids("m") is None
    assert led.tokens_for("m", "req-x") == 0  # a preempted request recomputes like any other
    assert led.cancel("m") is False
    assert pool.frees == [[]]  # only the (empty) spare at commit
    led.running("m")  # idempotent


def test_finished_before_adoption_frees_the_blocks():
    led, pool = ledger(10)
    led.reserve("m", 3)
    led.commit("m", 9, BLOCK)
    led.finished("m")
    assert led.block_ids("m") is None and pool.num_free == 10


def test_finished_uncommitted_frees_too():
    led, pool = ledger(10)
    led.reserve("m", 3)
    led.finished("m")
    assert led.block_ids("m") is None and pool.frees == [[0, 1, 2]]


def test_finished_after_adoption_does_not_double_free():
    led, pool = ledger(10)
    led.reserve("m", 3)
    led.commit("m", 9, BLOCK)
    led.tokens_for("m", "req-x")
    frees_before = list(pool.frees)
    led.finished("m")  # vLLM freed the blocks with the request
    assert pool.frees == frees_before and pool.num_free == 7
    assert led.block_ids("m") is None
    led.finished("m")  # and again: nothing
    assert pool.frees == frees_before


def test_cancel():
    led, pool = ledger(10)
    assert led.cancel("nope") is False
    led.reserve("a", 2)
    assert led.cancel("a") is True and pool.frees == [[0, 1]] and led.block_ids("a") is None
    assert led.cancel("a") is False
    led.reserve("b", 2)
    led.commit("b", 8, BLOCK)
    assert led.cancel("b") is True  # committed but never adopted (the add failed)
    led.reserve("c", 2)
    led.commit("c", 8, BLOCK)
    led.tokens_for("c", "req-c")
    free_before = pool.num_free
    assert led.cancel("c") is False  # adopted: vLLM owns the blocks
    assert pool.num_free == free_before and led.block_ids("c") is not None


def test_expire_frees_only_uncommitted_reservations_past_their_deadline(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(km, "time", SimpleNamespace(monotonic=lambda: now[0]))
    led, pool = ledger(20, timeout_s=10.0)
    led.reserve("old", 2)          # deadline 10
    led.reserve("old-committed", 2)
    led.commit("old-committed", 8, BLOCK)
    now[0] = 5.0
    led.reserve("young", 2)        # deadline 15
    now[0] = 10.0
    assert led.expire() == 0  # not past yet (strictly)
    now[0] = 12.0
    assert led.expire() == 1
    assert led.block_ids("old") is None
    assert led.block_ids("old-committed") == [2, 3]  # committed: the commit path owns it
    assert led.block_ids("young") == [4, 5]
    assert led.expired_reservations == 1
    assert pool.frees[-1] == [0, 1]
    now[0] = 100.0
    assert led.expire() == 1 and led.expired_reservations == 2
    assert led.block_ids("young") is None and led.block_ids("old-committed") == [2, 3]


# ---------------------------------------------------------------- source stop marks

def test_stop_marks_are_taken_once():
    led, _ = ledger()
    assert led.take_stop_mark("i1") is None
    led.mark_stopping("i1", "m#tail", 5)
    led.mark_stopping("i2", "n#tail", 0)
    assert led.take_stop_mark("i1") == StopMark("m#tail", 5)
    assert led.take_stop_mark("i1") is None
    assert led.take_stop_mark("i2") == StopMark("n#tail", 0)
