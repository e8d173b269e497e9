"""`disagg-serve`: the command line. Other tools script against these exact forms."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc

from cluster.bench.studies import STUDIES, load_study
from cluster.client import Client, status_to_dict
from cluster.config import (
    KV_FAILURE_POLICIES,
    KV_PUSH_MODES,
    KV_TRANSPORTS,
    POOL_RESOURCES,
    PREFIX_ROUTING_POLICIES,
    SPEC_BUDGETS,
    DeploymentConfig,
    EngineConfig,
    MigrationConfig,
    PoolConfig,
    PrefixRoutingConfig,
    RouterConfig,
    ServeConfig,
    SpecConfig,
    TransferConfig,
)
from cluster.entrypoints.autoscale_args import add_autoscaler_args, autoscaler_config_from_args
from cluster.entrypoints.config_file import ConfigFileError, load_config_file
from cluster.entrypoints.status_format import format_drain, format_migration, format_status_table
from cluster.models.demo import build_demo_models, demo_draft, demo_target
from cluster.models.random_weights import write_random_model
from router.openai.chat import load_chat_template

# The commands that serve or measure (up, demo, bench, bench-suite) import their modules when they
# run: those pull in Ray, torch and vLLM, and `status` or `generate` should answer in milliseconds.


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="model directory (default: the demo target model)")
    g.add_argument("--max-model-len", type=int, default=1024)
    g.add_argument("--block-size", type=int, default=None, help="KV block size (default: vLLM's)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's (128 on CPU)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--kv-cache-gib", type=float, default=0.5, help="CPU: KV cache per instance, GiB")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="run the model eagerly (--no-enforce-eager: vLLM compiles it with torch.compile, "
                        "slower start-up)")
    g.add_argument("--seed", type=int, default=0)


def _add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML serving config (see cluster/config_file.py); flags given here win")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' to join the local node); "
                                                   "default starts a local Ray instance")
    p.add_argument("--colocated", type=int, default=None, metavar="N",
                   help="colocated instances, prefill and decode in one engine (default 1 unless "
                        "--prefill/--decode are given)")
    p.add_argument("--prefill", type=int, default=0, metavar="P", help="prefill pool instances")
    p.add_argument("--decode", type=int, default=0, metavar="D", help="decode pool instances")
    p.add_argument("--prefill-resource", default=POOL_RESOURCES["prefill"],
                   help="Ray custom resource the prefill nodes advertise")
    p.add_argument("--decode-resource", default=POOL_RESOURCES["decode"],
                   help="Ray custom resource the decode nodes advertise")
    tp = p.add_argument_group("tensor parallelism (per pool; DistServe: each phase its own)")
    tp.add_argument("--prefill-tp", type=int, default=1, metavar="N", help="ranks per prefill instance")
    tp.add_argument("--decode-tp", type=int, default=1, metavar="M", help="ranks per decode instance")
    tp.add_argument("--colocated-tp", type=int, default=1, metavar="K", help="ranks per colocated instance")
    sp = p.add_argument_group("speculative decoding (decode-side engines)")
    sp.add_argument("--spec-draft-model", default=None, metavar="DIR",
                    help="draft model directory ('demo' for the demo draft); off when unset")
    sp.add_argument("--spec-k", type=int, default=3, help="window k (default budget: k per request)")
    sp.add_argument("--spec-extra", type=int, default=1, help="extra proposals e (draft proposes k+e)")
    sp.add_argument("--spec-capacity", type=int, default=None,
                    help="verification budget in draft tokens per step (default N*k)")
    sp.add_argument("--tetris", action=argparse.BooleanOptionalAction, default=True,
                    help="TETRIS draft selection (--no-tetris: plain window k)")
    sp.add_argument("--tetris-min-batch", type=int, default=2,
                    help="below this batch size every request verifies plain window k")
    sp.add_argument("--spec-budget", choices=SPEC_BUDGETS, default="goodput",
                    help="goodput: each step verifies 0..N*(k+e) drafts, whatever maximises predicted "
                         "goodput (SmartSpec; 0 = no speculation that step); fixed: N*k every step")
    t = p.add_argument_group("KV transfer")
    t.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto",
                   help="auto: shared memory between ranks on one host, a TCP stream across hosts; "
                        "nccl: CuPy NCCL between GPUs")
    t.add_argument("--kv-transfer-timeout", type=float, default=30.0, help="deadline of one transfer, s")
    t.add_argument("--kv-hold-timeout", type=float, default=60.0,
                   help="a prefill frees KV nobody fetched after this many s")
    t.add_argument("--kv-failure-policy", choices=KV_FAILURE_POLICIES, default="recompute",
                   help="on a failed or late transfer: decode prefills itself, or the request fails")
    t.add_argument("--kv-push", choices=KV_PUSH_MODES, default="pull",
                   help="pull: the decode instance fetches the KV once the prefill is done; layerwise: "
                        "the decode instance is chosen at dispatch and the prefill pushes each layer's KV "
                        "as it computes it (Splitwise)")
    pr = p.add_argument_group("prefix reuse (prefill and colocated pools)")
    pr.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                    help="vLLM's prefix cache on prefill and colocated engines (decode engines keep it off: "
                         "live migration needs that); off with --kv-push layerwise, which pushes computed "
                         "blocks only")
    pr.add_argument("--prefix-routing", choices=PREFIX_ROUTING_POLICIES, default="prefix",
                    help="prefix: the instance with the fewest queued + uncached prompt tokens (a cached "
                         "prefix counts); load: fewest queued prompt tokens only")
    pr.add_argument("--session-slack-tokens", type=int, default=PrefixRoutingConfig.session_slack_tokens,
                    help="a conversation (session_id) stays on its instance while that costs at most this "
                         "many prompt tokens more than the cheapest instance")
    pr.add_argument("--colocated-request-cost-tokens", type=int,
                    default=PrefixRoutingConfig.colocated_request_cost_tokens,
                    help="prefix routing: what a request running on a colocated instance costs, in prompt tokens")
    _add_migration_args(p)
    add_autoscaler_args(p)
    p.add_argument("--cpus-per-instance", type=float, default=1.0,
                   help="CPUs per rank: an instance asks Ray for this times its TP degree")
    p.add_argument("--gpus-per-instance", type=float, default=0.0,
                   help="GPUs per rank: an instance asks Ray for this times its TP degree")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus endpoint port")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /metrics) on this port (0: a free one; default: off)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the HTTP API (default: the model path)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template (a file or the template text) for chat completions "
                        "(default: the tokenizer's own)")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="0: the model's max length - 1")
    p.add_argument("--actor-timeout", type=float, default=30.0, help="deadline of each worker call, s")
    p.add_argument("--stream-interval-ms", type=float, default=0.0,
                   help="least time between two messages of one stream: tokens arriving meanwhile go out "
                        "together (less front-end CPU per token, up to this much more inter-token latency)")
    p.add_argument("--max-in-flight", type=int, default=512,
                   help="admission control: requests in flight at once (past it RESOURCE_EXHAUSTED)")
    p.add_argument("--max-tokens-limit", type=int, default=0, help="largest max_tokens accepted (0: any)")
    p.add_argument("--instance-wait", type=float, default=120.0, metavar="S",
                   help="how long a request waits for an instance of the role it needs while every one "
                        "is (re)starting, before it fails with UNAVAILABLE")
    p.add_argument("--max-replays", type=int, default=2,
                   help="times a request is replayed elsewhere after its instance died")
    p.add_argument("--respawn", action=argparse.BooleanOptionalAction, default=True,
                   help="replace dead instances with fresh ones")
    p.add_argument("--orphan-timeout", type=float, default=60.0,
                   help="a worker frees its requests when not polled for this long (router gone), s")
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--auth-token", default=os.environ.get("DISAGG_AUTH_TOKEN"),
                   help="require 'authorization: Bearer TOKEN' (default: $DISAGG_AUTH_TOKEN; off)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    _add_deployment_args(p)
    _add_engine_args(p)


_DEPLOYMENT_DEFAULTS = DeploymentConfig()


def _add_deployment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment (engines and scheduler outlive `up` on a Ray cluster it did not start)")
    g.add_argument("--name", default=_DEPLOYMENT_DEFAULTS.name,
                   help="the deployment's name (its Ray namespace): `up --address` reattaches to a running "
                        "deployment of this name, `down --name` stops it")
    g.add_argument("--frontends", type=int, default=_DEPLOYMENT_DEFAULTS.frontends, metavar="K",
                   help="front end processes on this node (gRPC + HTTP each); a fixed --port is shared "
                        "(SO_REUSEPORT), HTTP and metrics ports count up from the given ones")
    g.add_argument("--load-report-interval", type=float, default=_DEPLOYMENT_DEFAULTS.load_interval_s,
                   metavar="S", help="how often the scheduler reads each engine's load and requests, s")
    g.add_argument("--frontend-heartbeat", type=float, default=_DEPLOYMENT_DEFAULTS.heartbeat_s, metavar="S",
                   help="how often a front end reports to the scheduler, s")
    g.add_argument("--frontend-timeout", type=float, default=_DEPLOYMENT_DEFAULTS.frontend_timeout_s,
                   metavar="S", help="a front end silent this long shows as gone in status, s")
    g.add_argument("--scheduler-max-restarts", type=int, default=_DEPLOYMENT_DEFAULTS.scheduler_max_restarts,
                   help="times Ray restarts the global scheduler after it dies (-1: always)")


def deployment_config_from_args(args) -> DeploymentConfig:
    try:
        return DeploymentConfig(name=args.name, frontends=args.frontends, load_interval_s=args.load_report_interval,
                                heartbeat_s=args.frontend_heartbeat, frontend_timeout_s=args.frontend_timeout,
                                scheduler_max_restarts=args.scheduler_max_restarts)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc


_MIGRATION_DEFAULTS = MigrationConfig()

# (flag, MigrationConfig field, type, help); defaults come from MigrationConfig itself.
_MIGRATION_FLAGS = (
    ("--migration-interval-s", "interval_s", float, "seconds between load-balancing rounds"),
    ("--migrate-out-threshold", "migrate_out_threshold", float,
     "a decode instance below this freeness (free KV blocks per running request) gives requests away"),
    ("--migrate-in-threshold", "migrate_in_threshold", float,
     "a decode instance above this freeness takes requests in (>= the out threshold)"),
    ("--migration-max-pairs", "max_pairs_per_round", int, "source/destination pairs per round"),
    ("--priority-headroom-blocks", "high_priority_headroom_blocks", int,
     "KV blocks kept free on every decode instance for high-priority requests (0: off)"),
    ("--high-priority-threshold", "high_priority_threshold", int, "priority >= this is high-priority"),
    ("--migration-stop-copy-blocks", "stop_copy_blocks", int,
     "stop and copy the tail once a pre-copy stage filled fewer new full blocks than this"),
    ("--migration-max-stages", "max_stages", int, "pre-copy stages at most before the stop"),
    ("--migration-timeout-s", "timeout_s", float, "deadline of one whole migration, s"),
    ("--migration-reservation-timeout-s", "reservation_timeout_s", float,
     "a destination frees an uncommitted reservation after this many s (source or router gone)"),
    ("--migration-reserve-watermark-blocks", "reserve_watermark_blocks", int,
     "KV blocks a destination keeps free beyond a reservation"),
    ("--drain-timeout-s", "drain_timeout_s", float, "default deadline of `drain`, s"),
)


def _add_migration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live migration (decode pool)")
    g.add_argument("--migration", action=argparse.BooleanOptionalAction, default=_MIGRATION_DEFAULTS.enabled,
                   help="automatic load balancing by live migration between decode instances "
                        "(--no-migration: off; the migrate and drain commands work either way)")
    g.add_argument("--migration-selection", choices=["last", "shortest", "longest"],
                   default=_MIGRATION_DEFAULTS.selection,
                   help="which request a busy instance gives away: last arrived, fewest or most blocks")
    for flag, name, kind, text in _MIGRATION_FLAGS:
        g.add_argument(flag, dest=flag[2:].replace("-", "_"), type=kind,
                       default=getattr(_MIGRATION_DEFAULTS, name), help=text)


def _coerce(kind: type, value, flag: str):
    """A --config value as the flag's type: argparse converts only command-line strings."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, str))
    try:
        number = kind(value) if ok else None
    except ValueError:
        number = None
    if number is None or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise SystemExit(f"error: {flag} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}")
    return number


def migration_config_from_args(args) -> MigrationConfig:
    fields = {name: _coerce(kind, getattr(args, flag[2:].replace("-", "_")), flag)
              for flag, name, kind, _ in _MIGRATION_FLAGS}
    if not isinstance(args.migration, bool):
        raise SystemExit(f"error: migration must be true or false, got {args.migration!r}")
    if not fields["drain_timeout_s"] > 0:
        raise SystemExit("error: --drain-timeout-s must be > 0")
    try:
        return MigrationConfig(enabled=args.migration, selection=args.migration_selection, **fields)
    except ValueError as exc:  # out of range, or a selection from --config argparse never saw
        raise SystemExit(f"error: migration: {exc}") from exc


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="localhost:50051")
    p.add_argument("--auth-token", default=os.environ.get("DISAGG_AUTH_TOKEN"),
                   help="bearer token (default: $DISAGG_AUTH_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM CA bundle: connect over TLS")


def _client(args):
    return Client(args.server, auth_token=args.auth_token, tls_ca=args.tls_ca)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_up_args(sub.add_parser("up", help="start serving (blocks until SIGINT/SIGTERM)"))

    fe = sub.add_parser("frontend", help="one more front end (gRPC + HTTP) of a running deployment, on any "
                                         "node of its Ray cluster (takes `up`'s options; the engines' are the "
                                         "deployment's)")
    _add_up_args(fe)
    fe.add_argument("--frontend-id", default=None, help="its name in status (default: fe-HOST-PID)")
    fe.add_argument("--reuse-port", action="store_true",
                    help="share the gRPC port with other front ends on this node (SO_REUSEPORT)")

    dn = sub.add_parser("down", help="stop a deployment for good (its engines and scheduler)")
    dn.add_argument("--name", default=_DEPLOYMENT_DEFAULTS.name)
    dn.add_argument("--address", default="auto", help="its Ray cluster (default: the local node's)")

    gen = sub.add_parser("generate", help="stream one completion's text to stdout")
    _add_client_args(gen)
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--timeout", type=float, default=None)
    gen.add_argument("prompt")

    st = sub.add_parser("status", help="the instances and their load")
    _add_client_args(st)
    st.add_argument("--json", action="store_true")

    mig = sub.add_parser("migrate", help="live-migrate a running request to another decode instance")
    _add_client_args(mig)
    mig.add_argument("request_id")
    mig.add_argument("--to", default=None, metavar="INSTANCE",
                     help="destination decode instance (default: the router picks the freest)")
    mig.add_argument("--json", action="store_true")

    dr = sub.add_parser("drain", help="send an instance no new requests and empty it (a decode "
                                      "instance's requests migrate away); --cancel undrains")
    _add_client_args(dr)
    dr.add_argument("instance")
    dr.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="deadline for the drain, s (default: the server's --drain-timeout-s)")
    dr.add_argument("--cancel", action="store_true", help="undrain: the instance takes new requests again")
    dr.add_argument("--json", action="store_true")

    mod = sub.add_parser("models", help="build (or find) the demo models; prints their directory last")
    mod.add_argument("dir", nargs="?", default=None)

    rnd = sub.add_parser("random-model", help="write a random-weight model of a real shape")
    rnd.add_argument("--preset", default="llama-1b")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("dir", nargs="?", default=None)

    from cluster.bench.harness import add_bench_args

    add_bench_args(sub.add_parser("bench", help="benchmark a running server (vllm bench serve style)"))

    # A study's own options are parsed once it is chosen (parse_args): building every study's
    # parser would import them all, and with them Ray and torch, for every command.
    suite = sub.add_parser("bench-suite", help="comparison studies (baseline vs new, same run)",
                           description="`disagg-serve bench-suite STUDY --help` lists a study's options.")
    suite.add_argument("study", choices=sorted(STUDIES))
    suite.add_argument("study_args", nargs=argparse.REMAINDER, help="the study's options")

    from cluster.planner.commands import add_plan_args, add_profile_args

    add_profile_args(sub.add_parser("profile", help="measure this hardware's engine costs; writes a profile JSON"))
    add_plan_args(sub.add_parser("plan", help="DistServe placement / Mélange GPU mix from a profile; writes a "
                                              "serve config for `up --config`"))

    demo = sub.add_parser("demo", help="models + local cluster + streamed completions + summary")
    demo.add_argument("--colocated", type=int, default=0,
                      help="N colocated instances instead of the default 1 prefill + 1 decode")
    demo.add_argument("--port", type=int, default=0)
    demo.add_argument("--spec", action=argparse.BooleanOptionalAction, default=True,
                      help="speculative decoding with TETRIS on the decode side")
    return parser


def serve_config_from_args(args) -> ServeConfig:
    model = args.model or demo_target()
    engine = EngineConfig(
        model=model,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        cpu_kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        orphan_timeout_s=args.orphan_timeout,
        # Layer-wise push sends only the blocks a step computes: a prefix hit's blocks would never
        # reach the decode instance, so the prefill must compute every prompt in full then.
        enable_prefix_caching=args.prefix_caching and args.kv_push != "layerwise",
    )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: TLS needs both --tls-cert and --tls-key")
    try:
        load_chat_template(args.chat_template)  # fail now, not after the engines have loaded
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    router = RouterConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, http_port=args.http_port,
        served_model_name=args.served_model_name, chat_template=args.chat_template,
        default_max_tokens=args.default_max_tokens, max_prompt_tokens=args.max_prompt_tokens,
        actor_call_timeout_s=args.actor_timeout, startup_timeout_s=args.startup_timeout,
        stream_interval_s=max(0.0, args.stream_interval_ms) / 1000,
        max_tokens_limit=args.max_tokens_limit, max_in_flight=args.max_in_flight,
        max_replays=args.max_replays, respawn_dead=args.respawn, instance_wait_s=args.instance_wait,
        tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token=args.auth_token,
    )
    disaggregated = args.prefill > 0 or args.decode > 0
    if disaggregated and (args.prefill <= 0 or args.decode <= 0):
        raise SystemExit("error: disaggregated serving needs both --prefill P and --decode D (>= 1 each)")
    if disaggregated and args.colocated:
        raise SystemExit("error: choose colocated (--colocated N) or disaggregated (--prefill/--decode) serving")
    colocated = args.colocated if args.colocated is not None else (0 if disaggregated else 1)
    cpus, gpus = args.cpus_per_instance, args.gpus_per_instance
    pools = tuple(pool for pool in (
        PoolConfig("colocated", colocated, cpus, gpus, tensor_parallel_size=args.colocated_tp),
        PoolConfig("prefill", args.prefill, cpus, gpus, args.prefill_resource or None, args.prefill_tp),
        PoolConfig("decode", args.decode, cpus, gpus, args.decode_resource or None, args.decode_tp),
    ) if pool.num_instances > 0)
    if not pools:
        raise SystemExit("error: no instances: give --colocated N or --prefill P --decode D")
    transfer = TransferConfig(transport=args.kv_transport, timeout_s=args.kv_transfer_timeout,
                              hold_timeout_s=args.kv_hold_timeout, failure_policy=args.kv_failure_policy,
                              push=args.kv_push)
    draft = args.spec_draft_model
    if draft == "demo":
        draft = demo_draft()
    try:  # a --config value never went through argparse's choices
        spec = SpecConfig(draft_model=draft, k=args.spec_k, extra=args.spec_extra, capacity=args.spec_capacity,
                          tetris=args.tetris, min_batch_size=args.tetris_min_batch, budget=args.spec_budget)
    except ValueError as exc:
        raise SystemExit(f"error: spec: {exc}") from exc
    try:
        prefix_routing = PrefixRoutingConfig(
            policy=args.prefix_routing, session_slack_tokens=args.session_slack_tokens,
            colocated_request_cost_tokens=args.colocated_request_cost_tokens)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    return ServeConfig(engine=engine, router=router, pools=pools, transfer=transfer, spec=spec,
                       prefix_routing=prefix_routing,
                       migration=migration_config_from_args(args), address=args.address,
                       autoscaler=autoscaler_config_from_args(args, pools),
                       deployment=deployment_config_from_args(args))


def cmd_up(args) -> int:
    from cluster.entrypoints.launcher import serve_until_signal

    asyncio.run(serve_until_signal(serve_config_from_args(args), frontend_argv=getattr(args, "argv_rest", [])))
    return 0


def cmd_frontend(args) -> int:
    from cluster.entrypoints.frontend_process import serve_frontend

    args.model = args.model or "(the deployment's)"  # serving what runs: the model is the deployment's
    config = serve_config_from_args(args)
    asyncio.run(serve_frontend(config.replace(address=args.address or "auto"), frontend_id=args.frontend_id,
                               reuse_port=args.reuse_port))
    return 0


def cmd_down(args) -> int:
    from cluster.entrypoints.launcher import down

    stopped = down(args.address, args.name)
    print(f"deployment {args.name!r}: " + (f"stopped {', '.join(stopped)}" if stopped else "nothing was running"))
    return 0


def cmd_generate(args) -> int:
    with _client(args) as client:
        try:
            last = None
            for msg in client.stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                     stop=args.stop, timeout=args.timeout):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg
            sys.stdout.write("\n")
            if last is not None:
                print(f"[{last.request_id}] finish={last.finish_reason} prompt_tokens={last.usage.prompt_tokens} "
                      f"completion_tokens={last.usage.completion_tokens} served_by={','.join(last.served_by)}",
                      file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def cmd_status(args) -> int:
    with _client(args) as client:
        try:
            status = status_to_dict(client.cluster_status())
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(status, indent=2) if args.json else format_status_table(status))
    return 0


def cmd_migrate(args) -> int:
    with _client(args) as client:
        try:
            m = client.migrate(args.request_id, args.to)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(m, indent=2) if args.json else format_migration(m))
    return 0 if m["state"] == "committed" else 1


def cmd_drain(args) -> int:
    with _client(args) as client:
        try:
            d = client.drain(args.instance, timeout_s=args.timeout, cancel=args.cancel)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(d, indent=2) if args.json else format_drain(d, args.cancel))
    return 0 if d["remaining"] == 0 else 1


def cmd_models(args) -> int:
    print(build_demo_models(args.dir))
    return 0


def cmd_random_model(args) -> int:
    print(write_random_model(args.dir or os.path.join(os.getcwd(), "random-models"), args.preset, seed=args.seed))
    return 0


def cmd_bench(args) -> int:
    from cluster.bench.harness import main as bench_main

    return bench_main(args)


def cmd_bench_suite(args) -> int:
    return load_study(args.study).main(args)


def _parse_study_args(args: argparse.Namespace) -> argparse.Namespace:
    """The chosen study's options, parsed by its own parser, merged into `args`."""
    parser = argparse.ArgumentParser(prog=f"disagg-serve bench-suite {args.study}")
    load_study(args.study).add_args(parser)
    study_args = parser.parse_args(args.study_args)
    merged = vars(args) | vars(study_args)
    del merged["study_args"]
    return argparse.Namespace(**merged)


def cmd_profile(args) -> int:
    from cluster.planner.commands import run_profile_command

    return run_profile_command(args)


def cmd_plan(args) -> int:
    from cluster.planner.commands import run_plan_command

    code, written = run_plan_command(args)
    if written is not None:
        # The file is only useful if `up` takes it: parse it exactly as `up --config` would.
        try:
            serve_config_from_args(parse_args(["up", "--config", str(written)]))
        except SystemExit as exc:
            print(f"plan: the serve config {written} is not accepted by `up --config` on this build: {exc}",
                  file=sys.stderr)
            return 1
        print(f"checked: `disagg-serve up --config {written}` accepts it")
    return code


def cmd_demo(args) -> int:
    from cluster.entrypoints.demo import run_demo

    return run_demo(colocated=args.colocated, port=args.port, speculative=args.spec)


COMMANDS = {"up": cmd_up, "frontend": cmd_frontend, "down": cmd_down, "generate": cmd_generate,
            "status": cmd_status, "migrate": cmd_migrate,
            "drain": cmd_drain, "models": cmd_models,
            "random-model": cmd_random_model, "bench": cmd_bench, "bench-suite": cmd_bench_suite,
            "demo": cmd_demo, "profile": cmd_profile, "plan": cmd_plan}


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line; for `up`, a --config file supplies defaults that flags override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("up", "frontend") and args.config:
        up = _subparser(parser, args.command)
        valid = {a.dest for a in up._actions if a.dest not in ("help", "config")}
        try:
            up.set_defaults(**load_config_file(args.config, valid))
        except ConfigFileError as exc:
            parser.error(str(exc))
        args = parser.parse_args(argv)
    if args.command == "bench-suite":
        args = _parse_study_args(args)
    if args.command == "up":  # what more front ends of this `up` are started with
        raw = list(sys.argv[1:] if argv is None else argv)
        args.argv_rest = raw[raw.index("up") + 1:] if "up" in raw else []
    return args


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def main(argv=None) -> int:
    args = parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
