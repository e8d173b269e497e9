"""DispatchIndex answers exactly what freeness.pick_dispatch answers, on random views and
through any sequence of updates (the scheduler keeps it current as loads and placements change)."""

from __future__ import annotations

import random

import pytest

from cluster.config import FreenessConfig
from router.dispatch_index import DispatchIndex
from router.freeness import InstanceView, pick_dispatch


def random_view(rng: random.Random, iid: str) -> InstanceView:
    total = rng.choice([50, 100, 1000])
    waiting = rng.choice([0, 0, 1, 3])
    return InstanceView(iid, total, rng.randint(0, total), rng.randint(0, 20), waiting,
                        head_waiting_blocks=rng.randint(0, 30) if waiting else 0,
                        high_priority_running=rng.randint(0, 2), draining=rng.random() < 0.1,
                        migrating=rng.random() < 0.1)


@pytest.mark.parametrize("threshold", [1, 3])
@pytest.mark.parametrize("headroom", [0, 8])
@pytest.mark.parametrize("seed", range(6))
def test_same_choice_as_pick_dispatch_through_updates(seed, headroom, threshold):
    rng = random.Random(seed)
    config = FreenessConfig(high_priority_headroom_blocks=headroom, high_priority_threshold=threshold)
    index = DispatchIndex(config)
    views = {}
    for i in range(40):
        views[f"d{i:02d}"] = random_view(rng, f"d{i:02d}")
        index.update(views[f"d{i:02d}"])
    for _ in range(300):
        op = rng.random()
        iid = f"d{rng.randrange(45):02d}"
        if op < 0.6:
            views[iid] = random_view(rng, iid)
            index.update(views[iid])
        elif op < 0.7:
            views.pop(iid, None)
            index.remove(iid)
        needed, priority = rng.randint(0, 60), rng.choice([0, 0, 0, 1, -1, 3])
        assert index.pick(needed, priority) == pick_dispatch(list(views.values()), config, needed, priority)
    assert len(index) == len(views)


def test_ties_and_empty():
    config = FreenessConfig()
    index = DispatchIndex(config)
    assert index.pick(1) is None
    for iid in ("b", "a", "c"):
        index.update(InstanceView(iid, 100, 50, 2, 0))
    assert index.pick(1) == "a"  # same key but the id: the smallest id
    index.update(InstanceView("a", 100, 50, 2, 0, draining=True))
    assert index.pick(1) == "b"
    assert index.pick(51) is None  # nothing has room
