"""PrefixTracker: vLLM's KV cache events -> the cluster's prefix names and a journal of changes.
The event classes here mirror vLLM 0.32's field names (test_vllm_adapter pins them)."""

from dataclasses import dataclass

from cluster.engine.prefix_tracker import PrefixTracker
from cluster.kv.prefix_hash import block_hashes


@dataclass
class BlockStored:
    block_hashes: list
    parent_block_hash: object
    token_ids: list
    block_size: int
    group_idx: int | None = 0


@dataclass
class BlockRemoved:
    block_hashes: list


class AllBlocksCleared:
    pass


BS = 4
PROMPT = list(range(10, 22))  # three full blocks


def test_stored_blocks_get_the_front_end_names_even_across_events():
    t = PrefixTracker()
    names = block_hashes(PROMPT, BS)
    # The first two blocks in one event, the third later (a chunked prefill, a decode filling it).
    t.on_events([BlockStored([b"a", b"b"], None, PROMPT[:8], BS)])
    t.on_events([BlockStored([b"c"], b"b", PROMPT[8:12], BS)])
    report = t.read(None)
    assert sorted(report["full"]) == sorted(names)
    assert t.num_blocks == 3


def test_deltas_removal_and_full_resync():
    t = PrefixTracker()
    names = block_hashes(PROMPT, BS)
    t.on_events([BlockStored([b"a", b"b", b"c"], None, PROMPT, BS)])
    first = t.read(None)
    t.on_events([BlockRemoved([b"c"])])
    delta = t.read(first["seq"])
    assert delta["added"] == [] and delta["removed"] == [names[2]]
    # Removed and stored again since the reader's position: only the final state counts.
    t.on_events([BlockStored([b"c2"], b"b", PROMPT[8:12], BS)])
    t.on_events([BlockRemoved([b"b"])])
    delta = t.read(delta["seq"])
    assert delta["added"] == [names[2]] and delta["removed"] == [names[1]]
    assert "full" in t.read(delta["seq"] + 5)  # a reader ahead of us (a new incarnation): resync
    t.on_events([AllBlocksCleared()])
    assert t.read(None)["full"] == []


def test_duplicate_blocks_keep_a_name_until_the_last_goes():
    t = PrefixTracker()
    t.on_events([BlockStored([b"a"], None, PROMPT[:4], BS), BlockStored([b"x"], None, PROMPT[:4], BS)])
    pos = t.read(None)["seq"]
    t.on_events([BlockRemoved([b"a"])])
    assert t.read(pos) == {"seq": pos, "added": [], "removed": []}
    t.on_events([BlockRemoved([b"x"])])
    assert t.read(pos)["removed"] == block_hashes(PROMPT[:4], BS)


def test_lagging_reader_gets_the_whole_set_and_unknown_parents_are_counted():
    t = PrefixTracker(journal_limit=2)
    for i in range(5):
        t.on_events([BlockStored([i], None, [i] * BS, BS)])
    assert "full" in t.read(1) and len(t.read(1)["full"]) == 5
    assert set(t.read(3)) == {"seq", "added", "removed"}
    t.on_events([BlockStored([b"z"], b"never-seen", PROMPT[:4], BS)])
    assert t.orphan_blocks == 1 and t.num_blocks == 5
    t.on_events([BlockStored([b"g1"], None, PROMPT[:4], BS, group_idx=1)])  # other KV groups: ignored
    assert t.num_blocks == 5
