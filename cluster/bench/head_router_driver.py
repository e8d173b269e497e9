"""The front-end capacity study's baseline: the pre-split Router (one process: request table,
placement, token pump, detokenization, gRPC) of an exported source tree, serving over the same
simulated engine actors as the new front ends, in the same run.

Run as a script with `--tree` pointing at a copy of the repository as it was before the split
(`git archive <rev>`): the tree goes first on sys.path, so `router.router` and its neighbours
are that tree's. Prints `READY <port>`, serves until SIGTERM. Benchmarks only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--instances", required=True, help="comma-separated instance ids")
    p.add_argument("--model", required=True, help="tokenizer directory")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    sys.path.insert(0, args.tree)
    asyncio.run(_serve(args))
    return 0


async def _serve(args) -> None:
    import ray

    from cluster.config import MigrationConfig, RouterConfig  # the tree's
    from cluster.models.tokenizer import load_serving_tokenizer
    from router.instances import Instance
    from router.router import Router
    from router.server import DisaggServeServicer, start_grpc_server
    from router.validation import Limits

    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    instances = []
    for iid in args.instances.split(","):
        actor = ray.get_actor(f"engine:{iid}", namespace=args.namespace)
        instances.append(Instance(info=ray.get(actor.info.remote()), actor=actor))
    config = RouterConfig(host="127.0.0.1", port=args.port, max_in_flight=100_000)
    router = Router(config, instances, load_serving_tokenizer(args.model), respawn=None,
                    migration=MigrationConfig(enabled=False))
    router.start()
    first = instances[0].info
    limits = Limits(max_model_len=first.max_model_len, vocab_size=first.vocab_size, default_max_tokens=256,
                    max_prompt_tokens=first.max_model_len - 1)
    servicer = DisaggServeServicer(router, args.model, limits, first.block_size, first.eos_token_ids,
                                   first.bos_token_id)
    server, port = await start_grpc_server(servicer, "127.0.0.1", args.port, max_concurrent_rpcs=100_064)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"READY {port}", flush=True)
    await stop.wait()
    await server.stop(1.0)
    await router.stop()


if __name__ == "__main__":
    sys.exit(main())
