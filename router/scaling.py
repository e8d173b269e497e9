"""The scaling loop: every `AutoscalerConfig.interval_s` it observes each pool from the
instances' load reports, asks the policy (router/autoscaler.py) and acts on its decisions
through the cluster's own scale hooks. Every decision is logged with its reason; actions are
counted in Prometheus.

It acts only through a small interface (`ScalableCluster`) that the router and the global
scheduler both offer:

    instances                      id -> router.instances.Instance (role, state, load, in_flight)
    add_instance(role) -> id       scale-out: starts an engine (asking Ray for its resources, so a
                                   Ray / KubeRay autoscaler adds a node when none has room)
    remove_instance(id, timeout)   scale-in: drains the instance first (its decode requests
                                   live-migrate away; prefill and colocated ones finish), then
                                   stops it; returns {"remaining": requests not moved, ...}

What it observes, per pool, over `window_s`: the token rates the engines served (differences
of their cumulative counters: prompt tokens computed, tokens generated, requests finished),
the mean prompt and output lengths those imply, the requests waiting in the engines now, and
(decode) the mean Llumnix freeness. Serving rates understate demand once a pool saturates;
the queueing signal covers that case.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from cluster.config import AutoscalerConfig, FreenessConfig
from router import autoscaler as policy
from router.freeness import InstanceView, freeness
from router.instances import Instance, InstanceState

log = logging.getLogger(__name__)


class ScalableCluster(Protocol):
    instances: dict[str, Instance]

    async def add_instance(self, role: str) -> str: ...

    async def remove_instance(self, instance_id: str, drain_timeout_s: float | None = None) -> dict: ...


@dataclass(frozen=True)
class _Sample:
    at: float
    prompt_tokens: int
    output_tokens: int
    finished: int


class ScalingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        self.decisions = Counter("disagg_autoscaler_decisions", "Autoscaler decisions that change a pool",
                                 ["pool", "action", "signal"], registry=r)
        self.actions = Counter("disagg_autoscaler_actions", "Scale actions carried out, by outcome",
                               ["pool", "action", "outcome"], registry=r)
        self.target = Gauge("disagg_autoscaler_target_instances", "Instances the autoscaler wants per pool",
                            ["pool"], registry=r)
        self.utilization = Gauge("disagg_autoscaler_utilization",
                                 "Pool load over its capacity (profile's model), -1 when unknown",
                                 ["pool"], registry=r)


class ScalingLoop:
    def __init__(self, cluster: ScalableCluster, config: AutoscalerConfig,
                 capacity: policy.CapacityModel | None = None, registry: CollectorRegistry | None = None,
                 freeness_config: FreenessConfig | None = None, clock=time.monotonic):
        self.cluster = cluster
        self.config = config
        self.policy = policy.Autoscaler(config, capacity)
        self.metrics = ScalingMetrics(registry)
        self.freeness = freeness_config or FreenessConfig()
        self.clock = clock
        self._samples: dict[str, deque] = {}
        # Scale actions under way, per pool (add/remove tasks not finished yet).
        self._adding: dict[str, int] = {}
        self._removing: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.history: list[tuple[float, policy.ScaleDecision]] = []
        self._stopping = False

    @classmethod
    def from_config(cls, cluster: ScalableCluster, config: AutoscalerConfig,
                    registry: CollectorRegistry | None = None,
                    freeness_config: FreenessConfig | None = None) -> ScalingLoop:
        """The loop for a deployment: its capacity model is the config's table (if any)."""
        capacity = policy.TableCapacity(config.capacity_table) if config.capacity_table else None
        return cls(cluster, config, capacity, registry, freeness_config)

    # ---- observation ----
    def _sample(self, now: float) -> None:
        for inst in self.cluster.instances.values():
            if inst.load is None or not inst.serving:
                continue
            q = self._samples.setdefault(inst.instance_id, deque())
            load = inst.load
            q.append(_Sample(now, load.prompt_tokens_computed, load.tokens_generated, load.requests_finished))
            while len(q) > 2 and q[1].at <= now - self.config.window_s:
                q.popleft()
        for iid in list(self._samples):
            if iid not in self.cluster.instances:
                del self._samples[iid]

    def _rates(self, members: list[Instance]) -> tuple[float, float, float, int, int]:
        """(prompt tokens/s, output tokens/s, requests finished/s, prompt tokens, output tokens)
        summed over the pool's instances over the window."""
        prompt = output = finished = 0.0
        d_prompt = d_output = 0
        for inst in members:
            q = self._samples.get(inst.instance_id)
            if not q or len(q) < 2:
                continue
            first, last = q[0], q[-1]
            span = last.at - first.at
            if span <= 0:
                continue
            dp, do, df = (max(0, last.prompt_tokens - first.prompt_tokens),
                          max(0, last.output_tokens - first.output_tokens), max(0, last.finished - first.finished))
            prompt += dp / span
            output += do / span
            finished += df / span
            d_prompt += dp
            d_output += do
        return prompt, output, finished, d_prompt, d_output

    def observe(self) -> list[policy.PoolLoad]:
        now = self.clock()
        self._sample(now)
        by_role: dict[str, list[Instance]] = {}
        for inst in self.cluster.instances.values():
            by_role.setdefault(inst.role, []).append(inst)
        # Mean lengths across the cluster: prompts from the pools that compute them, outputs
        # from the pools that decode (a request's length is the same whichever pool sees it).
        rates = {role: self._rates([i for i in members if i.serving]) for role, members in by_role.items()}
        entry = [r for r in ("prefill", "colocated") if r in rates]
        exit_ = [r for r in ("decode", "colocated") if r in rates]
        prompt_finished = sum(rates[r][2] for r in entry)
        output_finished = sum(rates[r][2] for r in exit_)
        mean_prompt = sum(rates[r][0] for r in entry) / prompt_finished if prompt_finished > 0 else 0.0
        mean_output = sum(rates[r][1] for r in exit_) / output_finished if output_finished > 0 else 0.0
        loads = []
        for role, members in sorted(by_role.items()):
            ready = [i for i in members if i.state == InstanceState.READY]
            prompt_tps, output_tps, finished, _, _ = rates[role]
            mean_freeness = None
            if role == "decode":
                views = [self._view(i) for i in ready if i.load is not None]
                if views:
                    mean_freeness = sum(freeness(v, self.freeness) for v in views) / len(views)
            starting = sum(1 for i in members if i.state == InstanceState.STARTING) + self._adding.get(role, 0)
            draining = sum(1 for i in members if i.state == InstanceState.DRAINING or i.instance_id in self._removing)
            loads.append(policy.PoolLoad(
                role=role, ready=len([i for i in ready if i.instance_id not in self._removing]),
                starting=starting, draining=draining,
                arrival_rate=finished, mean_prompt_tokens=mean_prompt, mean_output_tokens=mean_output,
                prompt_tokens_per_s=prompt_tps if role in ("prefill", "colocated") else 0.0,
                output_tokens_per_s=output_tps if role in ("decode", "colocated") else 0.0,
                waiting=sum(i.load.num_waiting for i in ready if i.load is not None),
                mean_freeness=mean_freeness,
                instances=tuple((i.instance_id, self._running(i)) for i in ready
                                if i.instance_id not in self._removing)))
        return loads

    @staticmethod
    def _running(inst: Instance) -> int:
        return max(inst.load.num_running if inst.load else 0, len(inst.in_flight))

    def _view(self, inst: Instance) -> InstanceView:
        load = inst.load
        return InstanceView(inst.instance_id, load.num_total_blocks, min(load.num_free_blocks, load.num_total_blocks),
                            self._running(inst), load.num_waiting, load.head_waiting_blocks)

    # ---- decisions ----
    def evaluate_once(self) -> list[policy.ScaleDecision]:
        """One observation and decision round; starts the actions it decides (as tasks)."""
        now = self.clock()
        decisions = self.policy.evaluate(now, self.observe())
        for d in decisions:
            self.history.append((now, d))
            self.metrics.target.labels(pool=d.role).set(d.target)
            self.metrics.utilization.labels(pool=d.role).set(-1 if d.utilization is None else d.utilization)
            if not d.changes:
                log.debug("autoscaler %s: hold at %d (%s)", d.role, d.current, d.reason)
                continue
            self.metrics.decisions.labels(pool=d.role, action=d.action, signal=d.signal).inc()
            if d.action == policy.OUT:
                log.warning("autoscaler: scale out %s %d -> %d: %s", d.role, d.current, d.target, d.reason)
                for _ in range(d.target - d.current):
                    self._adding[d.role] = self._adding.get(d.role, 0) + 1
                    self._start(self._add(d.role))
            elif d.instance_id is not None:
                log.warning("autoscaler: scale in %s %d -> %d, removing %s: %s", d.role, d.current, d.target,
                            d.instance_id, d.reason)
                self._removing.add(d.instance_id)
                self._start(self._remove(d.role, d.instance_id))
        return decisions

    async def _add(self, role: str) -> None:
        try:
            iid = await self.cluster.add_instance(role)
            log.warning("autoscaler: %s %s started", role, iid)
            self.metrics.actions.labels(pool=role, action="out", outcome="started").inc()
        except Exception as exc:  # noqa: BLE001 - any start-up failure is logged and counted; the loop goes on
            log.error("autoscaler: starting a %s instance failed: %s: %s", role, type(exc).__name__, exc)
            self.metrics.actions.labels(pool=role, action="out", outcome="failed").inc()
        finally:
            self._adding[role] -= 1

    async def _remove(self, role: str, instance_id: str) -> None:
        try:
            result = await self.cluster.remove_instance(instance_id, self.config.drain_timeout_s)
            if isinstance(result, dict) and "error" in result:
                raise RuntimeError(result["error"])
            remaining = int(result.get("remaining", 0)) if isinstance(result, dict) else 0
            outcome = "removed" if remaining == 0 else "removed_with_requests"
            if isinstance(result, dict) and result.get("removed") is False:
                outcome = "kept"
            log.warning("autoscaler: %s %s: %s (%s)", role, instance_id, outcome, result)
            self.metrics.actions.labels(pool=role, action="in", outcome=outcome).inc()
        except Exception as exc:  # noqa: BLE001 - a failed scale-in leaves the instance; logged and counted
            log.error("autoscaler: removing %s failed: %s: %s", instance_id, type(exc).__name__, exc)
            self.metrics.actions.labels(pool=role, action="in", outcome="failed").inc()
        finally:
            self._removing.discard(instance_id)

    def _start(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.evaluate_once()
            except Exception:
                log.exception("autoscaler round failed")

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
