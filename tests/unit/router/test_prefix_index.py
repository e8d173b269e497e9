"""PrefixIndex (which instance holds which prefix) and the prefix-aware cost model."""

import random

from cluster.kv.prefix_hash import block_hashes
from router.prefix_index import PrefixIndex, RouteCandidate, RouteConfig, choose, cost

BS = 4


def test_matched_blocks_are_leading_blocks_only():
    idx = PrefixIndex()
    prompt = list(range(40))
    names = block_hashes(prompt, BS)  # 10 blocks
    idx.apply("p0", {"seq": 1, "full": names[:6]})
    idx.apply("p1", {"seq": 1, "full": names[:2] + names[3:9]})  # a hole at block 2
    assert idx.matched_blocks(names, ["p0", "p1", "p2"]) == {"p0": 6, "p1": 2, "p2": 0}
    assert idx.position("p0") == 1 and idx.position("p2") is None


def test_deltas_full_sets_and_forget():
    idx = PrefixIndex()
    names = block_hashes(list(range(20)), BS)
    idx.apply("p0", {"seq": 3, "full": names[:2]})
    idx.apply("p0", {"seq": 5, "added": names[2:4], "removed": [names[1]]})
    assert idx.matched_blocks(names, ["p0"]) == {"p0": 1}
    assert idx.num_blocks("p0") == 3 and idx.position("p0") == 5
    idx.apply("p0", {"seq": 1, "full": names})  # a respawned engine starts over
    assert idx.matched_blocks(names, ["p0"]) == {"p0": 5}
    idx.apply("p0", None)  # an engine without prefix caching reports nothing
    assert idx.position("p0") == 1
    idx.forget("p0")
    assert idx.matched_blocks(names, ["p0"]) == {"p0": 0} and idx.position("p0") is None
    assert not idx._holders  # nothing left behind


def test_random_updates_agree_with_a_plain_set_model():
    rng = random.Random(3)
    idx, model = PrefixIndex(), {"a": set(), "b": set()}
    universe = list(range(30))
    for seq in range(1, 300):
        iid = rng.choice("ab")
        if rng.random() < 0.1:
            full = set(rng.sample(universe, rng.randint(0, 12)))
            idx.apply(iid, {"seq": seq, "full": sorted(full)})
            model[iid] = full
        else:
            added = set(rng.sample(universe, 3))
            removed = set(rng.sample(universe, 3)) - added
            idx.apply(iid, {"seq": seq, "added": sorted(added), "removed": sorted(removed)})
            model[iid] = (model[iid] - removed) | added
        names = rng.sample(universe, 6)
        expected = {}
        for i in "ab":
            n = 0
            while n < len(names) and names[n] in model[i]:
                n += 1
            expected[i] = n
        assert idx.matched_blocks(names, "ab") == expected


def test_cost_model_prefix_wins_until_the_queue_outweighs_it():
    cfg = RouteConfig()
    hot = RouteCandidate("p0", queued_tokens=300, in_flight=1, cached_tokens=512)
    idle = RouteCandidate("p1", queued_tokens=0, in_flight=0)
    # 512 cached tokens saved vs 300 queued ahead: the cache wins.
    assert cost(hot, 600, cfg) == 300 + 88 and cost(idle, 600, cfg) == 600
    assert choose([hot, idle], 600, cfg).instance_id == "p0"
    assert choose([hot, idle], 600, cfg).reason == "prefix"
    # 600 queued ahead: the cache saves less than the queue costs, so load wins.
    busy = RouteCandidate("p0", queued_tokens=600, in_flight=1, cached_tokens=512)
    route = choose([busy, idle], 600, cfg)
    assert (route.instance_id, route.reason) == ("p1", "load_over_prefix")
    # Load-only routing ignores the cache (fewest queued tokens).
    route = choose([hot, idle], 600, RouteConfig(use_prefix=False))
    assert (route.instance_id, route.reason) == ("p1", "load")


def test_ties_and_per_request_cost():
    a = RouteCandidate("a", 0, 2)
    b = RouteCandidate("b", 0, 1)
    assert choose([a, b], 10, RouteConfig()).instance_id == "b"  # fewer in flight
    assert choose([RouteCandidate("b", 0, 0), RouteCandidate("a", 0, 0)], 10, RouteConfig()).instance_id == "a"
    cfg = RouteConfig(request_cost_tokens=100)
    crowded = RouteCandidate("c", 0, in_flight=5, cached_tokens=256)
    assert choose([crowded, RouteCandidate("d", 0, 0)], 300, cfg).instance_id == "d"  # 544 + 0 vs 300
    assert choose([], 10, cfg) is None


def test_session_affinity_is_soft():
    cfg = RouteConfig(session_slack_tokens=100)
    mine = RouteCandidate("p0", queued_tokens=80, in_flight=1)
    other = RouteCandidate("p1", queued_tokens=0, in_flight=0)
    route = choose([mine, other], 50, cfg, session_instance="p0")
    assert (route.instance_id, route.reason) == ("p0", "session")
    swamped = RouteCandidate("p0", queued_tokens=500, in_flight=3)
    route = choose([swamped, other], 50, cfg, session_instance="p0")
    assert (route.instance_id, route.reason) == ("p1", "load_over_session")
    # The session's instance is gone (not a candidate): plain choice.
    route = choose([other], 50, cfg, session_instance="p0")
    assert (route.instance_id, route.reason) == ("p1", "load")


def test_session_table_is_bounded_and_forgets_dead_instances():
    from router.sessions import SessionTable

    t = SessionTable(max_sessions=2)
    t.put("a", "p0")
    t.put("b", "p1")
    t.get("a")
    t.put("a", "p0")  # used again: b is now the oldest
    t.put("c", "p0")
    assert (t.get("a"), t.get("b"), t.get("c")) == ("p0", None, "p0") and len(t) == 2
    t.forget_instance("p0")
    assert len(t) == 0 and t.get("") is None
    t.put("", "p0")  # no session id: nothing to remember
    assert len(t) == 0
