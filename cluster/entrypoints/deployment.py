"""A deployment on Ray: its engines and its global scheduler are detached actors named in the
Ray namespace of the deployment (`--name`), so they outlive whichever process started them.
This module makes them, finds them again (a restarted `up`, a `disagg-serve frontend` on
another node), checks that what runs is what was asked for, and tears a deployment down.

It is the one place that maps a pool's role to its worker class (it sits above the router and
the role workers): the scheduler gets a `RayEngineSpawner` to start and replace engines. The
worker classes (and with them vLLM) are imported only when an engine is spawned: front ends and
the scheduler use this module too, and must start in a second, not after importing vLLM.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import ray

from cluster.config import EngineConfig, PoolConfig, ServeConfig, SpecConfig, TransferConfig
from cluster.engine.parallelism import check_kv_exchange
from router.scheduler import GlobalScheduler

log = logging.getLogger(__name__)

SCHEDULER_NAME = "scheduler"
ENGINE_PREFIX = "engine:"
# What must match between a running deployment and an `up` that reattaches to it.
DEFINING = ("engine", "pools", "transfer", "spec", "migration")


def engine_actor_name(instance_id: str) -> str:
    return ENGINE_PREFIX + instance_id


def worker_class(role: str):
    """The worker actor class of a role (imports the role's package, and vLLM with it)."""
    if role == "colocated":
        from decode_worker.colocated import ColocatedWorker

        return ColocatedWorker
    if role == "prefill":
        from prefill_worker.worker import PrefillWorker

        return PrefillWorker
    if role == "decode":
        from decode_worker.worker import DecodeWorker

        return DecodeWorker
    raise ValueError(f"unknown role {role!r}")


def spawn_worker(config: EngineConfig, pool: PoolConfig, instance_id: str, transfer: TransferConfig,
                 spec: SpecConfig | None = None, **options):
    """Start one worker actor of `pool` (returns its handle at once; call info() to wait).
    `options`: more Ray actor options (name, namespace, lifetime)."""
    from cluster.engine.worker import ACTOR_CONCURRENCY  # with vLLM (see worker_class)

    resources = {pool.resource: 1} if pool.resource else None
    actor_cls = ray.remote(worker_class(pool.role))
    return actor_cls.options(
        num_cpus=pool.cpus_per_instance,
        num_gpus=pool.gpus_per_instance,
        resources=resources,
        max_concurrency=ACTOR_CONCURRENCY,
        **options,
    ).remote(engine_config_for(config, pool), instance_id, transfer, spec)


def engine_config_for(config: EngineConfig, pool: PoolConfig) -> EngineConfig:
    """The engine config of one instance of `pool` (the pool sets its tensor-parallel size).

    Decode instances keep prefix caching off whatever the config says: live migration hands a
    request blocks reserved straight from vLLM's block pool (decode_worker/migration_adapter.py),
    which bypasses the block hashes the prefix cache keeps (migration_supported refuses it). And a
    decode-side cache would save nothing: a conversation's next turn is prefilled on a prefill
    instance, never on a decode one. Reuse happens where prompts are computed: prefill and
    colocated instances."""
    prefix = config.enable_prefix_caching and pool.role != "decode"
    return dataclasses.replace(config, tensor_parallel_size=pool.tensor_parallel_size,
                               enable_prefix_caching=prefix)


class RayEngineSpawner:
    """The scheduler's EngineSpawner on Ray: detached engine actors named `engine:<instance id>`
    in the deployment's namespace. Picklable (the scheduler actor is built with it, and Ray
    builds it again when it restarts the scheduler)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.namespace = config.deployment.name

    def _pool(self, role: str) -> PoolConfig:
        for pool in self.config.pools:
            if pool.role == role:
                return pool
        # A role the initial pools do not have (scale-out): the first pool's resources.
        first = self.config.pools[0]
        return dataclasses.replace(first, role=role, num_instances=0, resource=None)

    def spawn(self, role: str, instance_id: str):
        return spawn_worker(self.config.engine, self._pool(role), instance_id, self.config.transfer,
                            self.config.spec, name=engine_actor_name(instance_id), namespace=self.namespace,
                            lifetime="detached")

    def find(self, instance_id: str):
        return find_engine(self.namespace, instance_id)

    def running_instances(self) -> list[str]:
        return running_engines(self.namespace)

    def kill(self, actor) -> None:
        kill_actor(actor)


def find_engine(namespace: str, instance_id: str):
    """The running engine actor of `instance_id` in the deployment, or None."""
    try:
        return ray.get_actor(engine_actor_name(instance_id), namespace=namespace)
    except ValueError:
        return None


def running_engines(namespace: str) -> list[str]:
    """Instance ids of the deployment's engine actors that exist now."""
    return sorted(a["name"][len(ENGINE_PREFIX):] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and a["name"].startswith(ENGINE_PREFIX))


def kill_actor(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - already gone
        log.debug("killing an actor: %s", exc)


class RayStateStore:
    """The scheduler's StateStore: Ray's internal key-value store (in the GCS), scoped to the
    deployment's namespace. It survives the scheduler actor, not the Ray cluster."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def get(self, key: str) -> str | None:
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(key, namespace=self.namespace)
        return value.decode() if value is not None else None

    def put(self, key: str, value: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, value.encode(), overwrite=True, namespace=self.namespace)

    def clear(self) -> None:
        from ray.experimental import internal_kv

        for key in internal_kv._internal_kv_list("", namespace=self.namespace):
            internal_kv._internal_kv_del(key, namespace=self.namespace)


def find_scheduler(name: str):
    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=name)
    except ValueError:
        return None


def config_differences(running: dict, asked: ServeConfig) -> list[str]:
    """What differs between a running deployment's config (GlobalScheduler.describe()) and
    `asked`, in the parts that define the deployment: "section.field: running X, asked Y"."""
    mine = dataclasses.asdict(asked)
    out = []
    for section in DEFINING:
        have, want = running.get(section), mine.get(section)
        if isinstance(have, dict) and isinstance(want, dict):
            for key in sorted(set(have) | set(want)):
                if have.get(key) != want.get(key):
                    out.append(f"{section}.{key}: running {have.get(key)!r}, asked {want.get(key)!r}")
        elif _normalized(have) != _normalized(want):
            out.append(f"{section}: running {have!r}, asked {want!r}")
    return out


def _normalized(value):
    """Tuples and lists compare alike (a config that went through Ray comes back with lists)."""
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    return value


def engine_differences(spawner: RayEngineSpawner, asked: ServeConfig, timeout_s: float = 30.0) -> list[str]:
    """Running engines of the deployment built differently from `asked` (no scheduler to ask)."""
    out = []
    for iid in spawner.running_instances():
        actor = spawner.find(iid)
        if actor is None:
            continue
        try:
            built = ray.get(actor.describe.remote(), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a dead or hung engine: the scheduler replaces it
            log.warning("engine %s did not describe itself: %s", iid, exc)
            continue
        pool = RayEngineSpawner(asked)._pool(built.get("role", ""))
        engine = engine_config_for(asked.engine, pool)
        for section, want in (("engine", engine), ("transfer", asked.transfer), ("spec", asked.spec)):
            have, want = built.get(section, {}), dataclasses.asdict(want)
            for key in sorted(set(have) | set(want)):
                if _normalized(have.get(key)) != _normalized(want.get(key)):
                    out.append(f"{iid} {section}.{key}: running {have.get(key)!r}, asked {want.get(key)!r}")
    return out


class DeploymentMismatch(RuntimeError):
    pass


def create_or_attach(config: ServeConfig):
    """The deployment's scheduler: the running one if the deployment exists (its config must
    match `config`), else a new one (which adopts engines of the deployment it finds, or starts
    them). Returns (scheduler handle, attached: bool)."""
    name = config.deployment.name
    scheduler = find_scheduler(name)
    if scheduler is not None:
        running = ray.get(scheduler.describe.remote(), timeout=60)
        diffs = config_differences(running, config)
        if diffs:
            raise DeploymentMismatch(_mismatch_message(name, diffs))
        return scheduler, True
    spawner = RayEngineSpawner(config)
    diffs = engine_differences(spawner, config)
    if diffs:
        raise DeploymentMismatch(_mismatch_message(name, diffs))
    actor_cls = ray.remote(GlobalScheduler)
    scheduler = actor_cls.options(
        name=SCHEDULER_NAME, namespace=name, lifetime="detached", num_cpus=0,
        max_restarts=config.deployment.scheduler_max_restarts, max_concurrency=1000,
    ).remote(config, spawner, RayStateStore(name))
    return scheduler, bool(spawner.running_instances())


def _mismatch_message(name: str, diffs: list[str]) -> str:
    shown = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
    return (f"deployment {name!r} already runs on this Ray cluster with a different configuration:\n  {shown}\n"
            f"Serve it as it is (same options), stop it first (`disagg-serve down --name {name} --address ...`), "
            f"or start another one beside it (`--name OTHER`).")


def wait_until_ready(scheduler, timeout_s: float, say=None) -> dict:
    """Waits until every instance is ready (or the deadline); prints each as it comes up."""
    started = time.monotonic()
    deadline = started + timeout_s
    announced: set[str] = set()
    ray.get(scheduler.wait_started.remote(), timeout=timeout_s)
    while True:
        states = ray.get(scheduler.ready_state.remote(), timeout=60)
        for iid, (state, pid, node, blocks, block_size, _) in states.items():
            if state in ("ready", "draining") and iid not in announced:
                announced.add(iid)
                if say is not None:
                    say(f"  {iid} ready on node {node[:8]} (pid {pid}, {blocks} KV blocks of {block_size} "
                        f"tokens) after {time.monotonic() - started:.1f}s")
        if all(s[0] in ("ready", "draining") for s in states.values()):
            return states
        failed = {iid: s[5] for iid, s in states.items() if s[0] == "dead" and s[5]}
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine instances not ready after {timeout_s:.0f}s: "
                               + ", ".join(f"{i} {s[0]}" for i, s in states.items())
                               + (f"; failures: {failed}" if failed else ""))
        time.sleep(0.5)


# Pools whose engines exchange KV: the prefill -> decode hand-off (decode -> decode migration
# and colocated pools run one TP degree each, so their layouts match by construction).
KV_EXCHANGES = (("prefill", "decode"),)


def check_kv_layouts(namespace: str, timeout_s: float = 60.0) -> None:
    """Raises ParallelismError when two pools that hand KV to each other run engines whose
    caches cannot be exchanged (model, dtype, block size or head geometry), checked on their
    first instances' published endpoints once they run: at start-up, not at the first request."""
    engines = running_engines(namespace)
    for source_role, dest_role in KV_EXCHANGES:
        source = next((i for i in engines if i.startswith(source_role + "-")), None)
        dest = next((i for i in engines if i.startswith(dest_role + "-")), None)
        if source is None or dest is None:
            continue
        actors = [find_engine(namespace, source), find_engine(namespace, dest)]
        if None in actors:
            continue  # replaced just now; the next start checks again
        source_ranks, dest_ranks = ray.get([a.kv_endpoints.remote() for a in actors], timeout=timeout_s)
        check_kv_exchange(source_role, source_ranks, dest_role, dest_ranks)


def shutdown(name: str, timeout_s: float = 120.0) -> list[str]:
    """Stops the deployment `name` for good: its engines, its scheduler, its stored state.
    Returns what it stopped."""
    stopped = []
    scheduler = find_scheduler(name)
    if scheduler is not None:
        try:
            stopped += [f"engine {i}" for i in ray.get(scheduler.shutdown_deployment.remote(), timeout=timeout_s)]
        except Exception as exc:  # noqa: BLE001 - a dead scheduler: the engines are killed below
            log.warning("the scheduler did not stop the engines: %s", exc)
        ray.kill(scheduler, no_restart=True)
        stopped.append("scheduler")
    for iid in running_engines(name):
        actor = find_engine(name, iid)
        if actor is not None:
            kill_actor(actor)
            if f"engine {iid}" not in stopped:
                stopped.append(f"engine {iid}")
    RayStateStore(name).clear()
    return stopped
