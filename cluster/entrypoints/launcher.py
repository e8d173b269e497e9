"""Starts a serving cluster: Ray, the worker pools, the router and its gRPC and metrics ports.

It wires every room together (it sits above the router and the role workers), so it is the
one place that maps a pool's role to its worker class.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass

import ray

from cluster.config import EngineConfig, PoolConfig, ServeConfig, SpecConfig, TransferConfig
from cluster.engine.worker import ACTOR_CONCURRENCY
from cluster.models.tokenizer import load_serving_tokenizer
from cluster.protocol import InstanceInfo
from decode_worker.colocated import ColocatedWorker
from decode_worker.worker import DecodeWorker
from prefill_worker.worker import PrefillWorker
from router.instances import Instance
from router.metrics import RouterMetrics
from router.router import Router
from router.server import DisaggServeServicer, start_grpc_server
from router.validation import Limits

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(f"[disagg-serve] {message}", file=sys.stderr, flush=True)


def init_ray(config: ServeConfig) -> None:
    if ray.is_initialized():
        return
    if config.address:
        ray.init(address=config.address, log_to_driver=config.worker_logs_to_driver)
        check_pool_resources(config)
        return
    needed = sum(p.num_cpus * p.num_instances for p in config.pools)
    # A local Ray instance is one node serving every pool: it advertises all pool resources.
    resources = {p.resource: p.num_instances for p in config.pools if p.resource and p.num_instances}
    for attempt in (1, 2, 3):
        try:
            ray.init(num_cpus=config.local_num_cpus or max(2, needed), resources=resources,
                     include_dashboard=False, log_to_driver=config.worker_logs_to_driver)
            return
        except Exception as exc:  # e.g. "node timed out during startup" on a loaded machine
            if attempt == 3:
                raise
            _say(f"starting Ray failed ({exc}); retrying")
            ray.shutdown()
            time.sleep(2.0 * attempt)


def check_pool_resources(config: ServeConfig) -> None:
    """On a real cluster, fail fast (not hang) when no node advertises a pool's resource."""
    available = ray.cluster_resources()
    for pool in config.pools:
        if not pool.resource or pool.num_instances == 0:
            continue
        have = available.get(pool.resource, 0)
        if have < pool.num_instances:
            raise RuntimeError(
                f"the {pool.role} pool needs {pool.num_instances} x resource {pool.resource!r}, but the Ray "
                f"cluster advertises {have:g}; start its nodes with "
                f"ray start --resources='{{\"{pool.resource}\": N}}'")


WORKER_CLASSES = {"colocated": ColocatedWorker, "prefill": PrefillWorker, "decode": DecodeWorker}


def spawn_worker(config: EngineConfig, pool: PoolConfig, instance_id: str, transfer: TransferConfig,
                 spec: SpecConfig | None = None):
    """Start one worker actor of `pool` (returns its handle at once; call info() to wait)."""
    resources = {pool.resource: 1} if pool.resource else None
    actor_cls = ray.remote(WORKER_CLASSES[pool.role])
    return actor_cls.options(
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        resources=resources,
        max_concurrency=ACTOR_CONCURRENCY,
    ).remote(config, instance_id, transfer, spec)


@dataclass
class RunningCluster:
    config: ServeConfig
    router: object
    server: object
    port: int
    actors: list
    metrics_server: object | None = None

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
        await self.router.stop()
        for actor in self.router.actors():
            try:
                ray.get(actor.shutdown.remote(), timeout=10)
            except ray.exceptions.RayError as exc:  # dead or hung: killing it below is enough
                log.debug("clean shutdown of an engine failed: %s", exc)
            ray.kill(actor)
        if self.metrics_server is not None:
            self.metrics_server[0].shutdown()


async def start_cluster(config: ServeConfig) -> RunningCluster:
    """Spawn every pool's actors, wait for their engines, start the router. Call in an event loop."""
    init_ray(config)
    actors, ids = [], []
    for pool in config.pools:
        for index in range(pool.num_instances):
            instance_id = f"{pool.role}-{index}"
            actors.append(spawn_worker(config.engine, pool, instance_id, config.transfer, config.spec))
            ids.append(instance_id)
    _say(f"starting {len(actors)} engine instance(s): {', '.join(ids)}")
    started = time.monotonic()
    futures = {asyncio.wrap_future(actor.info.remote().future()): i for i, actor in enumerate(actors)}
    infos: dict[int, InstanceInfo] = {}
    pending = set(futures)
    deadline = started + config.router.startup_timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            for actor in actors:
                ray.kill(actor)
            raise TimeoutError(f"engine instances not ready after {config.router.startup_timeout_s:.0f}s")
        done, pending = await asyncio.wait(pending, timeout=min(left, 5.0),
                                           return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            info = fut.result()  # raises the actor's start-up error, if any
            infos[futures[fut]] = info
            _say(f"  {info.instance_id} ready on node {info.node_id[:8]} "
                 f"({info.num_total_blocks} KV blocks of {info.block_size} tokens) "
                 f"after {time.monotonic() - started:.1f}s")
        if not done:
            _say(f"  waiting for {len(pending)} instance(s)... {time.monotonic() - started:.0f}s")
    instances = [Instance(info=infos[i], actor=actor) for i, actor in enumerate(actors)]
    first = instances[0].info
    metrics = RouterMetrics()
    pools = {p.role: p for p in config.pools}

    def respawn(info: InstanceInfo):
        return spawn_worker(config.engine, pools[info.role], info.instance_id, config.transfer, config.spec)

    router = Router(config.router, instances, load_serving_tokenizer(config.engine.tokenizer or config.engine.model),
                    metrics, respawn=respawn, migration=config.migration)
    router.start()
    max_prompt = config.router.max_prompt_tokens or first.max_model_len - 1
    limits = Limits(
        max_model_len=first.max_model_len,
        vocab_size=first.vocab_size,
        default_max_tokens=config.router.default_max_tokens,
        max_prompt_tokens=min(max_prompt, first.max_model_len - 1),
        max_tokens_limit=config.router.max_tokens_limit,
    )
    servicer = DisaggServeServicer(router, config.engine.model, limits, first.block_size,
                                   first.eos_token_ids, first.bos_token_id)
    rc = config.router
    tls = (rc.tls_cert, rc.tls_key) if rc.tls_cert else None
    server, port = await start_grpc_server(servicer, rc.host, rc.port, max_concurrent_rpcs=rc.max_in_flight + 64,
                                           tls=tls, auth_token=rc.auth_token)
    metrics_server = None
    if config.router.metrics_port is not None:
        metrics_server = metrics.serve(config.router.metrics_port)
        _say(f"Prometheus metrics on :{metrics_server[0].server_port}/metrics")
    _say(f"serving gRPC on {config.router.host}:{port}")
    return RunningCluster(config, router, server, port, actors, metrics_server)


async def serve_until_signal(config: ServeConfig) -> None:
    cluster = await start_cluster(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {cluster.port}", flush=True)
    await stop.wait()
    _say("shutting down")
    await cluster.stop()
    ray.shutdown()
    _say("stopped")
