"""Freeness policy on fake load reports: dispatch, pairing, de-fragmentation, priority headroom,
request selection."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.freeness import (
    FreenessConfig,
    InstanceView,
    RequestView,
    available_blocks,
    freeness,
    pair_migrations,
    pick_dispatch,
    select_request,
    virtual_usage,
)

CFG = FreenessConfig()


def inst(iid: str, free: int, running: int, waiting: int = 0, total: int = 1000, **kw) -> InstanceView:
    return InstanceView(iid, num_total_blocks=total, num_free_blocks=free, num_running=running,
                        num_waiting=waiting, **kw)


def req(rid: str, blocks: int, priority: int = 0, age: float = 0.0, tokens: int | None = None,
        iid: str = "src") -> RequestView:
    return RequestView(rid, iid, num_blocks=blocks,
                       num_tokens=blocks * 16 if tokens is None else tokens,
                       priority=priority, age_s=age)


# ---------------------------------------------------------------- freeness and virtual usage

def test_freeness_is_free_blocks_per_running_request():
    assert freeness(inst("a", 100, 4), CFG) == 25.0


def test_zero_running_uses_floor_of_one():
    assert freeness(inst("a", 100, 0), CFG) == 100.0
    assert freeness(inst("a", 100, 0), FreenessConfig(running_floor=4)) == 25.0


def test_draining_is_infinitely_used():
    v = inst("a", 900, 1, draining=True)
    assert virtual_usage(v, CFG) == math.inf
    assert freeness(v, CFG) == -math.inf
    assert freeness(v, CFG, request_priority=10) == -math.inf


def test_head_waiting_counts_only_when_something_waits():
    assert virtual_usage(inst("a", 100, 2, waiting=0, head_waiting_blocks=40), CFG) == 0
    assert virtual_usage(inst("a", 100, 2, waiting=1, head_waiting_blocks=40), CFG) == 40


def test_negative_room_is_the_undivided_deficit():
    # 10 free, head-of-line needs 30: deficit 20, whatever the batch size.
    small = inst("a", 10, 1, waiting=1, head_waiting_blocks=30)
    big = inst("b", 10, 10, waiting=1, head_waiting_blocks=30)
    assert freeness(small, CFG) == freeness(big, CFG) == -20
    worse = inst("c", 10, 10, waiting=1, head_waiting_blocks=50)
    assert freeness(worse, CFG) < freeness(big, CFG) < freeness(inst("d", 1, 50), CFG)


# ---------------------------------------------------------------- dispatch

def test_dispatch_freest_wins():
    views = [inst("a", 100, 10), inst("b", 100, 2), inst("c", 300, 10)]
    assert pick_dispatch(views, CFG, needed_blocks=5) == "b"  # 50 per request beats 30 and 10


def test_dispatch_fit_check():
    # "b" is freer per request but cannot hold 60 blocks.
    views = [inst("a", 200, 10), inst("b", 50, 1)]
    assert pick_dispatch(views, CFG, needed_blocks=60) == "a"
    assert pick_dispatch(views, CFG, needed_blocks=201) is None


def test_dispatch_never_draining():
    views = [inst("a", 999, 0, draining=True), inst("b", 10, 5)]
    assert pick_dispatch(views, CFG, needed_blocks=1) == "b"
    assert pick_dispatch(views, CFG, needed_blocks=1, priority=5) == "b"
    assert pick_dispatch(views, CFG, needed_blocks=20) is None


def test_dispatch_ties_deterministic():
    # Equal freeness: fewer running wins (idle beats one running with the same free blocks).
    assert pick_dispatch([inst("a", 100, 1), inst("b", 100, 0)], CFG, 1) == "b"
    # Equal freeness and running: fewer waiting wins.
    assert pick_dispatch([inst("a", 100, 2, waiting=1), inst("b", 100, 2)], CFG, 1) == "b"
    # Everything equal: smallest id, whatever the input order.
    views = [inst("c", 100, 2), inst("a", 100, 2), inst("b", 100, 2)]
    assert pick_dispatch(views, CFG, 1) == "a"
    assert pick_dispatch(list(reversed(views)), CFG, 1) == "a"


def test_dispatch_empty_and_all_draining():
    assert pick_dispatch([], CFG, 1) is None
    assert pick_dispatch([inst("a", 10, 0, draining=True), inst("b", 10, 0, draining=True)],
                         CFG, 1) is None


def test_dispatch_zero_blocks_fits_a_full_instance():
    assert pick_dispatch([inst("a", 0, 3, total=10)], CFG, needed_blocks=0) == "a"


# ---------------------------------------------------------------- de-fragmentation

def test_large_head_of_line_request_makes_instance_look_less_free():
    blocked = inst("a", 200, 4, waiting=1, head_waiting_blocks=180)  # (200-180)/4 = 5
    plain = inst("b", 100, 4)                                        # 100/4 = 25
    assert freeness(blocked, CFG) < freeness(plain, CFG)
    # Dispatch stops adding to the blocked instance although it has more raw free blocks.
    assert pick_dispatch([blocked, plain], CFG, needed_blocks=10) == "b"
    # It cannot even take a request bigger than what remains after the waiting one.
    assert pick_dispatch([blocked], CFG, needed_blocks=21) is None


def test_blocked_instance_becomes_migration_source():
    blocked = inst("a", 50, 4, waiting=1, head_waiting_blocks=120)   # deficit -70
    unblocked = inst("a", 50, 4)                                     # 12.5: not a source
    dst = inst("b", 800, 2)
    assert pair_migrations([unblocked, dst], CFG) == []
    assert pair_migrations([blocked, dst], CFG) == [("a", "b")]


# ---------------------------------------------------------------- priority headroom

HR = FreenessConfig(high_priority_headroom_blocks=50)


def test_headroom_is_virtual_usage_for_normal_requests_only():
    v = inst("a", 80, 2)
    assert virtual_usage(v, HR) == 50
    assert virtual_usage(v, HR, request_priority=1) == 0
    assert available_blocks(v, HR) == 30
    assert available_blocks(v, HR, request_priority=3) == 80
    # Negative priorities are less urgent than normal: they see the headroom as used too.
    assert virtual_usage(v, HR, request_priority=-1) == 50


def test_normal_request_refused_when_only_headroom_remains():
    only_headroom = inst("a", 50, 1)
    assert pick_dispatch([only_headroom], HR, needed_blocks=1) is None
    assert pick_dispatch([only_headroom], HR, needed_blocks=10, priority=1) == "a"


def test_normal_request_routed_elsewhere_high_priority_takes_headroom():
    a = inst("a", 60, 1)    # normal sees 10 blocks, high-priority 60
    b = inst("b", 40, 1)    # normal sees nothing (-10), high-priority 40
    assert pick_dispatch([a, b], HR, needed_blocks=20) is None
    assert pick_dispatch([a, b], HR, needed_blocks=5) == "a"
    assert pick_dispatch([b], HR, needed_blocks=30, priority=2) == "b"
    assert pick_dispatch([a, b], HR, needed_blocks=50, priority=2) == "a"


def test_high_priority_threshold_is_configurable():
    cfg = FreenessConfig(high_priority_headroom_blocks=50, high_priority_threshold=5)
    v = inst("a", 50, 1)
    assert pick_dispatch([v], cfg, needed_blocks=10, priority=4) is None
    assert pick_dispatch([v], cfg, needed_blocks=10, priority=5) == "a"


def test_eating_into_headroom_makes_a_migration_source():
    cfg = FreenessConfig(high_priority_headroom_blocks=50, migrate_out_threshold=1.0,
                         migrate_in_threshold=4.0)
    eaten = inst("a", 40, 4)          # 40 - 50 = -10
    dst = inst("b", 500, 4)
    assert freeness(eaten, cfg) == -10
    assert pair_migrations([eaten, dst], cfg) == [("a", "b")]


# ---------------------------------------------------------------- pairing

def test_pairs_most_loaded_with_least_loaded():
    views = [
        inst("mid-src", 6, 4),      # 1.5
        inst("worst", 2, 4),        # 0.5
        inst("best", 900, 3),       # 300
        inst("good", 100, 2),       # 50
        inst("neutral", 20, 4),     # 5: neither
    ]
    assert pair_migrations(views, CFG) == [("worst", "best"), ("mid-src", "good")]


def test_pairing_respects_thresholds():
    cfg = FreenessConfig(migrate_out_threshold=2.0, migrate_in_threshold=8.0)
    at_out = inst("s", 8, 4)        # exactly 2.0: not below
    at_in = inst("d", 32, 4)        # exactly 8.0: not above
    assert pair_migrations([at_out, at_in], cfg) == []
    assert pair_migrations([inst("s", 7, 4), at_in], cfg) == []
    assert pair_migrations([at_out, inst("d", 33, 4)], cfg) == []
    assert pair_migrations([inst("s", 7, 4), inst("d", 33, 4)], cfg) == [("s", "d")]


def test_pairing_max_pairs_and_disjoint():
    views = [inst(f"s{i}", i, 4) for i in range(4)] + [inst(f"d{i}", 500 + i, 1) for i in range(4)]
    cfg = FreenessConfig(max_pairs_per_round=2)
    assert pair_migrations(views, cfg) == [("s0", "d3"), ("s1", "d2")]
    assert pair_migrations(views, FreenessConfig(max_pairs_per_round=0)) == []
    # More sources than destinations: only as many pairs as destinations.
    few = [inst(f"s{i}", i, 4) for i in range(4)] + [inst("d", 500, 1)]
    assert pair_migrations(few, CFG) == [("s0", "d")]


def test_pairing_no_self_pairs_on_misconfigured_ids():
    # The same id reported twice (once loaded, once free) must not pair with itself.
    views = [inst("x", 1, 4), inst("x", 900, 1)]
    assert pair_migrations(views, CFG) == []


def test_draining_sources_first_even_above_threshold():
    views = [
        inst("loaded", 1, 4),                       # 0.25
        inst("drain", 900, 2, draining=True),       # -inf although nearly empty
        inst("d1", 900, 1),
        inst("d2", 800, 1),
    ]
    assert pair_migrations(views, CFG) == [("drain", "d1"), ("loaded", "d2")]


def test_draining_without_running_is_not_a_source_nor_destination():
    views = [inst("drain", 1000, 0, draining=True), inst("d", 900, 1)]
    assert pair_migrations(views, CFG) == []
    views = [inst("s", 1, 4), inst("drain", 1000, 0, draining=True)]
    assert pair_migrations(views, CFG) == []


def test_draining_sources_ordered_by_running_then_id():
    views = [
        inst("b", 900, 1, draining=True),
        inst("a", 900, 1, draining=True),
        inst("c", 900, 5, draining=True),
    ] + [inst(f"d{i}", 900 - i, 1) for i in range(3)]
    assert [s for s, _ in pair_migrations(views, CFG)] == ["c", "a", "b"]


def test_migrating_instances_excluded():
    views = [inst("s", 1, 4, migrating=True), inst("d", 900, 1)]
    assert pair_migrations(views, CFG) == []
    views = [inst("s", 1, 4), inst("d", 900, 1, migrating=True), inst("d2", 100, 1)]
    assert pair_migrations(views, CFG) == [("s", "d2")]


def test_source_with_only_high_priority_running_is_skipped_unless_draining():
    views = [inst("hp", 1, 3, high_priority_running=3), inst("lp", 3, 3), inst("d", 900, 1)]
    assert pair_migrations(views, CFG) == [("lp", "d")]
    views = [inst("hp", 1, 3, high_priority_running=3, draining=True), inst("d", 900, 1)]
    assert pair_migrations(views, CFG) == [("hp", "d")]


def test_pairing_edge_cases():
    assert pair_migrations([], CFG) == []
    assert pair_migrations([inst("a", 1, 0, draining=True)], CFG) == []
    assert pair_migrations([inst("a", 1, 4, draining=True), inst("b", 1, 4, draining=True)],
                           CFG) == []
    # Zero running everywhere: idle instances are destinations, never sources.
    assert pair_migrations([inst("a", 0, 0, total=10), inst("b", 900, 0)], CFG) == []


# ---------------------------------------------------------------- selection

REQS = [
    req("old-big", 40, age=30.0),
    req("mid", 20, age=10.0),
    req("new-small", 5, age=1.0),
    req("new-mid", 12, age=0.5),
]


def test_selection_last_is_most_recent():
    assert select_request(REQS, FreenessConfig(selection="last"), 100).request_id == "new-mid"


def test_selection_shortest_and_longest():
    assert select_request(REQS, FreenessConfig(selection="shortest"), 100).request_id == "new-small"
    assert select_request(REQS, FreenessConfig(selection="longest"), 100).request_id == "old-big"


def test_selection_only_what_fits():
    assert select_request(REQS, FreenessConfig(selection="longest"), 25).request_id == "mid"
    assert select_request(REQS, FreenessConfig(selection="last"), 10).request_id == "new-small"
    assert select_request(REQS, CFG, 4) is None
    assert select_request(REQS, CFG, -math.inf) is None


def test_selection_ties_deterministic():
    same = [req("b", 10, age=1.0), req("a", 10, age=1.0), req("c", 10, age=1.0)]
    for policy in ("last", "shortest", "longest"):
        cfg = FreenessConfig(selection=policy)
        assert select_request(same, cfg, 100).request_id == "a"
        assert select_request(list(reversed(same)), cfg, 100).request_id == "a"
    # "shortest"/"longest" break block ties on tokens.
    toks = [req("x", 10, tokens=150), req("y", 10, tokens=145)]
    assert select_request(toks, FreenessConfig(selection="shortest"), 100).request_id == "y"
    assert select_request(toks, FreenessConfig(selection="longest"), 100).request_id == "x"


def test_selection_prefers_normal_priority_and_keeps_high_priority():
    reqs = [req("hp-new", 5, priority=3, age=0.1), req("normal-old", 30, age=50.0)]
    cfg = FreenessConfig(selection="last")
    assert select_request(reqs, cfg, 100).request_id == "normal-old"
    # Only high-priority requests left: nothing moves off a non-draining instance...
    assert select_request(reqs[:1], cfg, 100) is None
    # ...but a draining instance gives them up, still after the normal ones.
    assert select_request(reqs, cfg, 100, source_draining=True).request_id == "normal-old"
    assert select_request(reqs[:1], cfg, 100, source_draining=True).request_id == "hp-new"
    # If the normal one does not fit, the draining source moves the high-priority one.
    assert select_request(reqs, cfg, 10, source_draining=True).request_id == "hp-new"


def test_selection_least_urgent_first():
    reqs = [req("normal", 5, priority=0, age=0.1), req("background", 30, priority=-2, age=90.0)]
    assert select_request(reqs, FreenessConfig(selection="last"), 100).request_id == "background"


def test_selection_empty():
    assert select_request([], CFG, 100) is None


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kw", [
    {"selection": "random"},
    {"running_floor": 0},
    {"high_priority_headroom_blocks": -1},
    {"max_pairs_per_round": -1},
    {"migrate_out_threshold": 10.0, "migrate_in_threshold": 5.0},
])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        FreenessConfig(**kw)


def test_view_rejects_bad_counts():
    with pytest.raises(ValueError):
        inst("a", 11, 1, total=10)
    with pytest.raises(ValueError):
        inst("a", 5, -1)


# ---------------------------------------------------------------- properties

@st.composite
def views_and_config(draw):
    n = draw(st.integers(0, 12))
    views = []
    for i in range(n):
        total = draw(st.integers(0, 400))
        running = draw(st.integers(0, 20))
        views.append(InstanceView(
            instance_id=f"i{i:02d}",
            num_total_blocks=total,
            num_free_blocks=draw(st.integers(0, total)),
            num_running=running,
            num_waiting=draw(st.integers(0, 5)),
            head_waiting_blocks=draw(st.integers(0, 100)),
            high_priority_running=draw(st.integers(0, running)),
            draining=draw(st.booleans()),
            migrating=draw(st.booleans()),
        ))
    out = draw(st.floats(-5, 20))
    cfg = FreenessConfig(
        high_priority_headroom_blocks=draw(st.integers(0, 30)),
        migrate_out_threshold=out,
        migrate_in_threshold=out + draw(st.floats(0, 20)),
        max_pairs_per_round=draw(st.integers(0, 6)),
        running_floor=draw(st.integers(1, 3)),
    )
    return views, cfg


@settings(max_examples=300, deadline=None)
@given(views_and_config())
def test_pairs_are_disjoint_and_respect_thresholds(data):
    views, cfg = data
    by_id = {v.instance_id: v for v in views}
    pairs = pair_migrations(views, cfg)
    assert len(pairs) <= cfg.max_pairs_per_round
    ids = [i for p in pairs for i in p]
    assert len(ids) == len(set(ids))  # disjoint, no self-pairs
    for src_id, dst_id in pairs:
        src, dst = by_id[src_id], by_id[dst_id]
        assert not src.migrating and not dst.migrating
        assert src.num_running > 0
        assert src.draining or freeness(src, cfg) < cfg.migrate_out_threshold
        assert not dst.draining and freeness(dst, cfg) > cfg.migrate_in_threshold
        assert freeness(src, cfg) < freeness(dst, cfg)
    # Greedy is maximal: as many pairs as the limit and the smaller side allow.
    n_src = sum(1 for v in views if not v.migrating and v.num_running > 0
                and (v.draining or v.high_priority_running < v.num_running)
                and (v.draining or freeness(v, cfg) < cfg.migrate_out_threshold))
    n_dst = sum(1 for v in views if not v.migrating and not v.draining
                and freeness(v, cfg) > cfg.migrate_in_threshold)
    assert len(pairs) == min(cfg.max_pairs_per_round, n_src, n_dst)
    # Sources come out most loaded first.
    src_f = [freeness(by_id[s], cfg) for s, _ in pairs]
    assert src_f == sorted(src_f)


@settings(max_examples=300, deadline=None)
@given(views_and_config(), st.integers(0, 200), st.integers(-2, 3))
def test_dispatch_picks_a_fitting_freest_instance(data, needed, priority):
    views, cfg = data
    chosen = pick_dispatch(views, cfg, needed, priority)
    fitting = [v for v in views if not v.draining and available_blocks(v, cfg, priority) >= needed]
    if not fitting:
        assert chosen is None
        return
    best = max(freeness(v, cfg, priority) for v in fitting)
    winner = next(v for v in fitting if v.instance_id == chosen)
    assert freeness(winner, cfg, priority) == best
