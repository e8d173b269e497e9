"""One front end of a deployment, wired up: a FrontEnd (router/frontend.py) registered with the
deployment's global scheduler, its gRPC server, its OpenAI-compatible HTTP API (`--http-port`)
and its Prometheus endpoint. `up` runs one in its own process and starts the others as
`disagg-serve frontend` processes; `disagg-serve frontend --address ...` adds one on any node.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import ray

from cluster.config import DeploymentConfig, EngineConfig, MigrationConfig, ServeConfig
from cluster.entrypoints.deployment import find_engine, find_scheduler
from cluster.models.tokenizer import load_serving_tokenizer
from router.frontend import FrontEnd
from router.metrics import RouterMetrics
from router.openai.app import build_app
from router.openai.backend import ServedModel
from router.openai.chat import load_chat_template
from router.openai.server import start_http_server
from router.server import DisaggServeServicer, start_grpc_server
from router.validation import Limits


def say(message: str) -> None:
    print(f"[disagg-serve] {message}", file=sys.stderr, flush=True)


def new_frontend_id() -> str:
    return f"fe-{socket.gethostname()}-{os.getpid()}"


@dataclass
class RunningFrontEnd:
    frontend: FrontEnd
    server: object
    port: int
    limits: Limits
    metrics_server: object | None = None
    http_server: object | None = None  # router.openai.server.HttpServer

    @property
    def http_port(self) -> int | None:
        """The OpenAI API's bound port (None: not served); `--http-port 0` picks a free one."""
        return self.http_server.port if self.http_server is not None else None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server[0].server_port if self.metrics_server is not None else None

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.http_server is not None:
            await self.http_server.stop(grace_s)
        await self.server.stop(grace_s)
        await self.frontend.stop()
        if self.metrics_server is not None:
            self.metrics_server[0].shutdown()


def load_tokenizer(config: ServeConfig):
    return load_serving_tokenizer(config.engine.tokenizer or config.engine.model)


async def start_frontend(config: ServeConfig, scheduler, *, frontend_id: str | None = None,
                         reuse_port: bool = False, timeout_s: float = 120.0, tokenizer=None) -> RunningFrontEnd:
    """Starts a front end of the deployment `config.deployment.name` (its scheduler handle:
    `scheduler`); the engine and model settings are the deployment's, the rest `config`'s."""
    rc = config.router
    namespace = config.deployment.name
    fid = frontend_id or new_frontend_id()
    if tokenizer is None:
        tokenizer = await asyncio.to_thread(load_tokenizer, config)
    metrics = RouterMetrics(migrations=False)
    info = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "address": ""}
    frontend = FrontEnd(rc, scheduler, tokenizer, fid, config.migration, config.deployment, metrics,
                        actor_lookup=lambda iid: find_engine(namespace, iid), info=info, transfer=config.transfer)
    await frontend.start(timeout_s)
    first = frontend.limits_info()
    max_prompt = rc.max_prompt_tokens or first.max_model_len - 1
    limits = Limits(
        max_model_len=first.max_model_len,
        vocab_size=first.vocab_size,
        default_max_tokens=rc.default_max_tokens,
        max_prompt_tokens=min(max_prompt, first.max_model_len - 1),
        max_tokens_limit=rc.max_tokens_limit,
    )
    servicer = DisaggServeServicer(frontend, config.engine.model, limits, first.block_size,
                                   first.eos_token_ids, first.bos_token_id)
    tls = (rc.tls_cert, rc.tls_key) if rc.tls_cert else None
    server, port = await start_grpc_server(servicer, rc.host, rc.port, max_concurrent_rpcs=rc.max_in_flight + 64,
                                           tls=tls, auth_token=rc.auth_token, reuse_port=reuse_port)
    frontend.info["address"] = f"{_advertised_host(rc.host)}:{port}"
    running = RunningFrontEnd(frontend, server, port, limits)
    if rc.metrics_port is not None:
        running.metrics_server = metrics.serve(rc.metrics_port)
        say(f"{fid}: Prometheus metrics on :{running.metrics_server[0].server_port}/metrics")
    if rc.http_port is not None:
        running.http_server = await _start_openai_api(config, frontend, limits, metrics)
        say(f"{fid}: serving the OpenAI API on http://{rc.host}:{running.http_server.port}/v1")
    say(f"{fid}: serving gRPC on {rc.host}:{port}")
    return running


async def _start_openai_api(config: ServeConfig, frontend: FrontEnd, limits: Limits, metrics: RouterMetrics):
    rc = config.router
    model = ServedModel(name=rc.served_model_name or config.engine.model, root=config.engine.model,
                        limits=limits, tokenizer=frontend.tokenizer,
                        chat_template=load_chat_template(rc.chat_template), created=int(time.time()))
    app = build_app(frontend, model, auth_token=rc.auth_token, health=frontend.health_problem,
                    metrics_registry=metrics.registry)
    tls = (rc.tls_cert, rc.tls_key) if rc.tls_cert else None
    return await start_http_server(app, rc.host, rc.http_port, tls=tls, limit_concurrency=rc.max_in_flight + 64)


def _advertised_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return ray.util.get_node_ip_address()
    return host


def deployment_config(scheduler, config: ServeConfig) -> ServeConfig:
    """`config`'s front-end settings on the running deployment's model and migration and
    deployment settings (a front end joining a deployment serves what runs; it needs nothing
    else of the deployment's config)."""
    running = ray.get(scheduler.describe.remote(), timeout=60)
    deployment = DeploymentConfig(**{**running["deployment"], "name": config.deployment.name,
                                     "frontends": config.deployment.frontends})
    return config.replace(engine=EngineConfig(**running["engine"]), migration=MigrationConfig(**running["migration"]),
                          deployment=deployment)


async def serve_frontend(config: ServeConfig, frontend_id: str | None = None, reuse_port: bool = False) -> None:
    """`disagg-serve frontend`: joins the Ray cluster, waits (bounded) for the deployment's
    scheduler, serves until SIGINT/SIGTERM. The deployment keeps running after it exits."""
    name = config.deployment.name
    ray.init(address=config.address or "auto", namespace=name, log_to_driver=False)
    deadline = time.monotonic() + config.router.startup_timeout_s
    scheduler = find_scheduler(name)
    while scheduler is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"error: no deployment {name!r} on this Ray cluster (start it with "
                             f"`disagg-serve up --name {name} --address ...`)")
        say(f"waiting for deployment {name!r} to start...")
        await asyncio.sleep(2.0)
        scheduler = find_scheduler(name)
    config = await asyncio.to_thread(deployment_config, scheduler, config)
    running = await start_frontend(config, scheduler, frontend_id=frontend_id, reuse_port=reuse_port,
                                   timeout_s=config.router.startup_timeout_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {running.port}", flush=True)
    await stop.wait()
    await running.stop()
    ray.shutdown()
