"""The global scheduler's prefix-aware dispatch on fake engines (no Ray): it keeps the engines'
prefix reports (full set first, then deltas from its position), sends a prompt to the instance
holding its prefix unless load outweighs it, keeps a conversation on its instance, counts
decisions by reason, and forgets a dead instance's cache."""

from __future__ import annotations

from cluster.config import PoolConfig, PrefixRoutingConfig
from cluster.engine.prefix_tracker import PrefixTracker
from cluster.kv.prefix_hash import block_hashes
from cluster.protocol import EngineSnapshot, LoadReport
from tests.unit.router.test_scheduler import FakeEngine, FakeSpawner, config, run, started, wait_for

BS = 16  # FakeEngine's block size


class BlockStored:
    """A vLLM BlockStored event as the tracker reads it."""

    def __init__(self, vllm_hashes, parent, tokens):
        self.block_hashes, self.parent_block_hash, self.token_ids = vllm_hashes, parent, tokens
        self.block_size, self.group_idx = BS, 0


class PrefixEngine(FakeEngine):
    def __init__(self, instance_id: str):
        super().__init__(instance_id)
        self.tracker = PrefixTracker()
        self.queued = 0
        self.sinces: list = []
        self.handlers["snapshot"] = self._prefix_snapshot

    def cache(self, tokens):
        n = len(tokens) // BS
        self.tracker.on_events([BlockStored([(self.instance_id, tuple(tokens[:(i + 1) * BS])) for i in range(n)],
                                       None, tokens[:n * BS])])

    def _prefix_snapshot(self, since=None):
        self._check()
        self.sinces.append(since)
        load = LoadReport(self.instance_id, 100, 100, 0, 0, self.queued)
        return EngineSnapshot(load=load, prefix=self.tracker.read(since))


class PrefixSpawner(FakeSpawner):
    def spawn(self, role, instance_id):
        engine = PrefixEngine(instance_id)
        self.running[instance_id] = engine
        self.spawned.append(instance_id)
        return engine


def prefill_config(**routing):
    cfg = config((PoolConfig("prefill", 2), PoolConfig("decode", 1)))
    return cfg.replace(prefix_routing=PrefixRoutingConfig(**routing))


def test_prompts_follow_their_cached_prefix_until_load_outweighs_it():
    spawner = PrefixSpawner()
    history = list(range(1000, 1100))  # 6 full blocks

    async def go():
        sched = await started(prefill_config(), spawner)
        p1 = spawner.running["prefill-1"]
        p1.cache(history)
        await wait_for(lambda: sched.prefixes.num_blocks("prefill-1") == 6)
        assert any(s is not None for s in p1.sinces)  # deltas after the first full read
        prompt = history + [7] * 30
        names = tuple(block_hashes(prompt, BS))
        first = sched.place("prefill", "a@1", len(prompt), prefix_hashes=names)["instance_id"]
        sched.unplace(first, "a@1")
        # prefill-1 has 96 of 130 tokens cached: it stays the cheapest up to 95 queued tokens.
        p1.queued = 500
        await wait_for(lambda: sched.instances["prefill-1"].load.queued_prompt_tokens == 500)
        second = sched.place("prefill", "b@1", len(prompt), prefix_hashes=names)["instance_id"]
        status = sched.status()["routing"]
        await sched.stop()
        return first, second, status

    first, second, status = run(go())
    assert (first, second) == ("prefill-1", "prefill-0")
    assert status["decisions"]["prefill"] == {"prefix": 1, "load_over_prefix": 1}
    assert status["expected_cached_tokens"]["prefill"] == 96
    assert status["indexed_blocks"] == {"prefill-0": 0, "prefill-1": 6}


def test_load_only_policy_ignores_the_cache():
    spawner = PrefixSpawner()
    history = list(range(50, 114))

    async def go():
        sched = await started(prefill_config(policy="load"), spawner)
        spawner.running["prefill-1"].cache(history)
        await wait_for(lambda: sched.prefixes.num_blocks("prefill-1") == 4)
        chosen = sched.place("prefill", "a@1", 64, prefix_hashes=tuple(block_hashes(history, BS)))
        await sched.stop()
        return chosen["instance_id"]

    assert run(go()) == "prefill-0"


def test_a_session_stays_until_its_instance_is_swamped_or_dies():
    spawner = PrefixSpawner()

    async def go():
        sched = await started(prefill_config(session_slack_tokens=100), spawner)
        where = sched.place("prefill", "t1@1", 40, session_id="conv")["instance_id"]
        sched.unplace(where, "t1@1")
        other = "prefill-1" if where == "prefill-0" else "prefill-0"
        spawner.running[other].queued = 0
        spawner.running[where].queued = 60  # within the slack: the conversation stays
        await wait_for(lambda: sched.instances[where].load.queued_prompt_tokens == 60)
        again = sched.place("prefill", "t2@1", 40, session_id="conv")["instance_id"]
        sched.unplace(again, "t2@1")
        spawner.running[where].queued = 400  # load wins
        await wait_for(lambda: sched.instances[where].load.queued_prompt_tokens == 400)
        moved = sched.place("prefill", "t3@1", 40, session_id="conv")["instance_id"]
        sched.unplace(moved, "t3@1")
        # The conversation now lives on `moved`; that instance dies: its cache and sessions go.
        spawner.running[moved].cache(list(range(32)))
        await wait_for(lambda: sched.prefixes.num_blocks(moved) == 2)
        spawner.running[moved].dead = True
        await wait_for(lambda: sched.prefixes.num_blocks(moved) == 0 and sched.sessions.get("conv") is None)
        decisions = sched.status()["routing"]["decisions"]["prefill"]
        await sched.stop()
        return where, again, moved, decisions

    where, again, moved, decisions = run(go())
    assert again == where and moved != where
    assert decisions["session"] == 1 and decisions["load_over_session"] == 1

