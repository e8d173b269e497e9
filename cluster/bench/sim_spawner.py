"""The global scheduler's EngineSpawner for simulated engines (cluster/bench/sim_engine.py), so
a real scheduler and real front ends run over them (front-end capacity studies). Kept apart
from the simulated engine so that its actors import nothing heavy."""

from __future__ import annotations

import ray

from cluster.bench.sim_engine import SimEngineWorker
from cluster.entrypoints.deployment import engine_actor_name, find_engine, kill_actor, running_engines


class SimSpawner:
    """The scheduler's EngineSpawner for simulated engines: named actors in the deployment's
    namespace (so front ends find them by name like real ones). Picklable."""

    def __init__(self, namespace: str, token_ids: list[int], step_s: float, model: str):
        self.namespace = namespace
        self.token_ids = list(token_ids)
        self.step_s = step_s
        self.model = model

    def spawn(self, role: str, instance_id: str):
        actor_cls = ray.remote(SimEngineWorker)
        return actor_cls.options(name=engine_actor_name(instance_id), namespace=self.namespace, num_cpus=0,
                                 max_concurrency=64, lifetime="detached").remote(
            instance_id, role, self.token_ids, self.step_s, self.model)

    def find(self, instance_id: str):
        return find_engine(self.namespace, instance_id)

    def running_instances(self) -> list[str]:
        return running_engines(self.namespace)

    def kill(self, actor) -> None:
        kill_actor(actor)
