"""The scaling loop over a fake cluster: what it observes from load reports, that it acts
through add_instance / remove_instance, and that every action is counted."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from cluster.config import AutoscalerConfig, PoolBounds
from cluster.protocol import InstanceInfo, LoadReport
from router.autoscaler import FixedCapacity, PoolCapacity
from router.instances import Instance, InstanceState
from router.scaling import ScalingLoop


def _info(iid: str) -> InstanceInfo:
    return InstanceInfo(iid, iid.rpartition("-")[0], "node", "m", 1024, 16, 100, 4096, (1,), 0)


def _load(iid: str, generated: int, finished: int, prompt: int = 0, waiting: int = 0, running: int = 1,
          free: int = 90) -> LoadReport:
    return LoadReport(iid, 100, free, running, waiting, 0, tokens_generated=generated, requests_finished=finished,
                      prompt_tokens_computed=prompt)


class FakeCluster:
    def __init__(self, ids):
        self.instances = {i: Instance(_info(i), actor=None) for i in ids}
        self.added, self.removed = [], []

    async def add_instance(self, role: str) -> str:
        iid = f"{role}-{len(self.instances)}"
        self.instances[iid] = Instance(_info(iid), actor=None, state=InstanceState.STARTING)
        self.added.append(iid)
        return iid

    async def remove_instance(self, instance_id: str, drain_timeout_s=None) -> dict:
        self.removed.append((instance_id, drain_timeout_s))
        del self.instances[instance_id]
        return {"instance_id": instance_id, "remaining": 0}


def _value(registry, name, labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_observes_token_rates_and_lengths_from_load_reports():
    clock = [0.0]
    cluster = FakeCluster(["prefill-0", "decode-0"])
    loop = ScalingLoop(cluster, AutoscalerConfig(enabled=True, bounds=(PoolBounds("decode", 1, 2),), window_s=10),
                       clock=lambda: clock[0])
    for t, gen, fin, prompt in ((0.0, 0, 0, 0), (2.0, 400, 4, 800)):
        clock[0] = t
        cluster.instances["prefill-0"].load = _load("prefill-0", fin, fin, prompt)
        cluster.instances["decode-0"].load = _load("decode-0", gen, fin, waiting=3)
        loads = {p.role: p for p in loop.observe()}
    d = loads["decode"]
    assert d.output_tokens_per_s == 200.0 and d.waiting == 3
    assert d.mean_prompt_tokens == 200.0 and d.mean_output_tokens == 100.0
    assert loads["prefill"].prompt_tokens_per_s == 400.0
    assert d.instances == (("decode-0", 1),)


def test_scales_out_and_in_through_the_cluster_hooks_and_counts_them():
    async def scenario():
        clock = [0.0]
        cluster = FakeCluster(["prefill-0", "decode-0"])
        registry = CollectorRegistry()
        cfg = AutoscalerConfig(enabled=True, bounds=(PoolBounds("decode", 1, 2),), window_s=5, scale_out_after=1,
                               scale_in_after=1, cooldown_s=0.0, max_waiting_per_instance=1, drain_timeout_s=7.0)
        loop = ScalingLoop(cluster, cfg, FixedCapacity({"decode": PoolCapacity(decode_tokens_per_s=1e6)}),
                           registry=registry, clock=lambda: clock[0])
        cluster.instances["decode-0"].load = _load("decode-0", 0, 0, waiting=5)
        out = loop.evaluate_once()
        await asyncio.sleep(0)
        await asyncio.gather(*loop._tasks)
        assert [d.action for d in out] == ["out"] and cluster.added == ["decode-2"]
        # The new one is ready and nothing waits any more: one too many.
        new = cluster.instances["decode-2"]
        new.state, new.load = InstanceState.READY, _load("decode-2", 0, 0, running=0)
        cluster.instances["decode-0"].load = _load("decode-0", 10, 1, waiting=0, running=2)
        clock[0] = 1.0
        out = loop.evaluate_once()
        await asyncio.gather(*loop._tasks)
        assert [(d.action, d.instance_id) for d in out] == [("in", "decode-2")]
        assert cluster.removed == [("decode-2", 7.0)]
        return registry

    registry = asyncio.run(scenario())
    out = {"pool": "decode", "action": "out", "signal": "queue"}
    assert _value(registry, "disagg_autoscaler_decisions_total", out) == 1
    removed = {"pool": "decode", "action": "in", "outcome": "removed"}
    assert _value(registry, "disagg_autoscaler_actions_total", removed) == 1
    assert _value(registry, "disagg_autoscaler_target_instances", {"pool": "decode"}) == 1


def test_a_failed_start_is_counted_and_the_loop_goes_on():
    class Failing(FakeCluster):
        async def add_instance(self, role):
            raise RuntimeError("no node has room")

    async def scenario():
        cluster = Failing(["decode-0"])
        registry = CollectorRegistry()
        cfg = AutoscalerConfig(enabled=True, bounds=(PoolBounds("decode", 2, 3),))
        loop = ScalingLoop(cluster, cfg, registry=registry)
        loop.evaluate_once()
        await asyncio.gather(*loop._tasks)
        assert loop._adding["decode"] == 0
        return registry

    registry = asyncio.run(scenario())
    failed = {"pool": "decode", "action": "out", "outcome": "failed"}
    assert _value(registry, "disagg_autoscaler_actions_total", failed) == 1
