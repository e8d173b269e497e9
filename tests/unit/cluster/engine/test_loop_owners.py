"""EngineLoop's per-front-end side on a scripted engine (no vLLM): deltas go to the front end
that owns the request, each front end's orphan lease frees only its own requests, the snapshot
the global scheduler reads, a migration's continuation, and ids that run only once."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from cluster.config import EngineConfig
from cluster.engine import loop as loop_module
from cluster.engine import vllm_adapter as va
from cluster.engine.loop import EngineLoop
from cluster.engine.outbox import Outbox
from cluster.protocol import EngineRequest, Sampling, TokenDelta


class ScriptedEngine:
    """Emits token 100 + step for every live request each step; finishes at max_tokens."""

    def __init__(self):
        self.live: dict[str, dict] = {}
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, request_id, prompt, params, priority=0):
        self.live[request_id] = {"max": params.max_tokens, "n": 0, "prompt": prompt["prompt_token_ids"]}
        return request_id + "-internal"

    def abort_request(self, ids):
        for request_id in ids:
            self.aborted.append(request_id)
            self.live.pop(request_id, None)

    def step(self):
        self.steps += 1
        outs = []
        for request_id, r in list(self.live.items()):
            r["n"] += 1
            done = r["n"] >= r["max"]
            outs.append(SimpleNamespace(
                request_id=request_id, finished=done, num_cached_tokens=0, prompt_token_ids=r["prompt"],
                outputs=[SimpleNamespace(token_ids=[100 + self.steps], finish_reason="length" if done else None,
                                         stop_reason=None)]))
            if done:
                del self.live[request_id]
        return outs


@pytest.fixture
def scripted(monkeypatch):
    """vLLM's adapter functions answered by the scripted engine (no vLLM import)."""
    monkeypatch.setattr(va, "executor_failed", lambda engine: False, raising=False)
    monkeypatch.setattr(va, "has_work", lambda engine: bool(engine.live))
    monkeypatch.setattr(va, "num_running", lambda engine: len(engine.live))
    monkeypatch.setattr(va, "queue_snapshot", lambda engine: (len(engine.live), 0, 0, 0))
    monkeypatch.setattr(va, "num_usable_blocks", lambda engine: 100)
    monkeypatch.setattr(va, "num_free_blocks", lambda engine: 100 - len(engine.live))
    monkeypatch.setattr(va, "to_sampling_params", lambda sampling, kv=None: sampling)
    loops = []

    def make(orphan_timeout_s: float = 60.0, clock=time.monotonic) -> EngineLoop:
        loop = EngineLoop(EngineConfig(model="m", orphan_timeout_s=orphan_timeout_s), "e0", engine=ScriptedEngine(),
                          clock=clock)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop()


def request(request_id: str, owner: str, max_tokens: int = 3, prompt=(1, 2, 3), priority: int = 0) -> EngineRequest:
    return EngineRequest(request_id, tuple(prompt), Sampling(max_tokens=max_tokens, min_tokens=2), priority,
                         owner=owner, arrival=123.0)


def drain(loop: EngineLoop, owner: str, until_finished: set[str], timeout_s: float = 10.0) -> list[TokenDelta]:
    got, deadline = [], time.monotonic() + timeout_s
    while until_finished and time.monotonic() < deadline:
        for d in loop.poll(0.2, owner).deltas:
            got.append(d)
            if d.finished:
                until_finished.discard(d.request_id)
    assert not until_finished, f"unfinished: {until_finished}"
    return got


def test_each_front_end_gets_only_its_own_requests(scripted):
    loop = scripted()
    loop.add(request("a@1", "fe-a"))
    loop.add(request("b@1", "fe-b"))
    a = drain(loop, "fe-a", {"a@1"})
    b = drain(loop, "fe-b", {"b@1"})
    assert {d.request_id for d in a} == {"a@1"} and {d.request_id for d in b} == {"b@1"}
    assert sum(len(d.token_ids) for d in a) == sum(len(d.token_ids) for d in b) == 3
    assert loop.poll(0.0, "fe-a").deltas == [] and loop.poll(0.0, "fe-c").deltas == []


class FakeClock:
    """Lease time that moves only when the test says (a loaded machine cannot expire a lease)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_silent_front_end_loses_its_requests_others_keep_theirs(scripted):
    clock = FakeClock()
    loop = scripted(orphan_timeout_s=10.0, clock=clock)
    loop.add(request("gone@1", "fe-gone", max_tokens=10_000))
    loop.add(request("alive@1", "fe-alive", max_tokens=10_000))
    # Both leases start at 1000. Only fe-alive polls (at 1006); at 1011 fe-gone has been silent
    # for 11 s (> 10), fe-alive for 5 s; whenever the loop thread looks, only fe-gone is expired.
    clock.now = 1006.0
    loop.poll(0.0, "fe-alive")
    clock.now = 1011.0
    deadline = time.monotonic() + 30  # only bounds the wait for the loop thread's next pass
    while "fe-gone" in loop.outbox.leases() and time.monotonic() < deadline:  # dropping it is the last step
        time.sleep(0.01)
    assert "gone@1" in loop.engine.aborted and "alive@1" not in loop.engine.aborted
    assert loop.orphans_freed == 1
    assert [r.request_id for r in loop.snapshot().requests] == ["alive@1"]
    assert "fe-gone" not in loop.outbox.leases()  # its queue and lease are dropped


def test_snapshot_shows_owners_progress_and_leases(scripted):
    loop = scripted()
    loop.add(request("a@1", "fe-a", max_tokens=10_000, prompt=(1, 2, 3, 4), priority=2))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        live = loop.snapshot().requests
        if live and live[0].num_output_tokens >= 2:
            break
        time.sleep(0.01)
    snap = loop.snapshot()
    (live,) = snap.requests
    assert (live.request_id, live.owner, live.num_prompt_tokens, live.priority, live.arrival) == (
        "a@1", "fe-a", 4, 2, 123.0)
    assert live.num_output_tokens >= 2
    assert "fe-a" in snap.owners and snap.load.num_running == 1


def test_continuation_is_prompt_plus_outputs_with_the_budget_left(scripted):
    loop = scripted()
    loop.add(request("a@1", "fe-a", max_tokens=10_000))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (loop.snapshot().requests and
                                               loop.snapshot().requests[0].num_output_tokens >= 3):
        time.sleep(0.01)

    def on_loop(lp):
        cont = lp.continuation("a@1", "a@1~m1")
        lp.end_request("a@1", "migrated", migration_id="a@1~m1", migrated_to="e1", continued_as="a@1~m1")
        return cont

    cont = loop.call(on_loop, 5.0)
    tokens = [t for d in drain(loop, "fe-a", {"a@1"}) for t in d.token_ids]
    assert loop.poll(0.0, "fe-a").deltas == []  # everything came in the drain above, the marker last
    assert cont.request_id == "a@1~m1" and cont.owner == "fe-a" and cont.arrival == 123.0
    assert cont.prompt_token_ids == (1, 2, 3, *tokens)
    assert cont.sampling.max_tokens == 10_000 - len(tokens)
    assert cont.sampling.min_tokens == max(0, 2 - len(tokens))
    assert loop.continuation("gone", "x") is None


def test_the_migrated_marker_names_the_continuation(scripted):
    loop = scripted()
    loop.add(request("a@1", "fe-a", max_tokens=10_000))
    time.sleep(0.05)
    loop.call(lambda lp: lp.end_request("a@1", "migrated", migration_id="m", migrated_to="e1",
                                        continued_as="a@1~m"), 5.0)
    deltas = drain(loop, "fe-a", {"a@1"})
    last = deltas[-1]
    assert (last.finish_reason, last.migration_id, last.migrated_to, last.continued_as) == (
        "migrated", "m", "e1", "a@1~m")


def test_an_id_runs_once_and_an_early_abort_refuses_it(scripted):
    loop = scripted()
    refused = []
    loop.on_refused = refused.append
    loop.add(request("a@1", "fe-a", max_tokens=2))
    drain(loop, "fe-a", {"a@1"})
    loop.add(request("a@1", "fe-a", max_tokens=2))  # a repeated add: ignored
    loop.abort(["late@1"])  # aborted before it ever arrived
    loop.add(request("late@1", "fe-a", max_tokens=2))
    deltas = drain(loop, "fe-a", {"late@1"})
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("late@1", "abort")]
    assert [r.request_id for r in refused] == ["a@1", "late@1"]
    assert loop.engine.steps >= 2 and "a@1" not in loop.engine.live


def test_fail_tells_the_owner_to_replay(scripted):
    loop = scripted()
    loop.call(lambda lp: lp.fail("x@1~m", "fe-a", "no room"), 5.0)
    (delta,) = drain(loop, "fe-a", {"x@1~m"})
    assert (delta.finish_reason, delta.error) == ("dead", "no room")
    loop.add(request("x@1~m", "fe-a"))
    assert drain(loop, "fe-a", {"x@1~m"})[0].finish_reason == "abort"  # refused from now on


def test_known_ids_are_bounded(scripted, monkeypatch):
    monkeypatch.setattr(loop_module, "KNOWN_IDS", 3)
    loop = scripted()
    loop.abort([f"x{i}" for i in range(10)])
    time.sleep(0.3)
    assert len(loop._known) == 3


def test_outbox_take_waits_for_its_owner_only():
    box = Outbox()
    box.put("b", [TokenDelta("b@1", [1])])
    started = time.monotonic()
    assert box.take("a", 0.2) == []
    assert time.monotonic() - started >= 0.15
    assert [d.request_id for d in box.take("b", 0.0)] == ["b@1"]
    assert box.silent_for("a") < 1.0 and box.silent_for("never") == 0.0
    box.put_many([("a", TokenDelta("a@1", [1])), ("a", TokenDelta("a@1", [2])), ("b", TokenDelta("b@1", [3]))])
    assert [d.token_ids for d in box.take("a", 0.0)] == [[1], [2]]
    assert box.drop("b") == 1 and "b" not in box.leases()
    box.close()
    started = time.monotonic()
    assert box.take("a", 5.0) == [] and time.monotonic() - started < 1.0
