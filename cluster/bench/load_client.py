"""A closed-loop streaming load generator, run as its own process so that its CPU time is not
the front end's: `concurrency` Generate streams at all times (a finished one is replaced at
once), spread over the given front-end addresses, for `duration_s`. Prints one JSON line:
tokens and messages received in the measured window, its length, errors, the client's own CPU.

    python -m cluster.bench.load_client --addresses A,B --concurrency 256 --max-tokens 200 \\
        --duration 10 --warmup 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

import grpc

from proto import disagg_pb2 as pb
from proto import disagg_pb2_grpc as pb_grpc


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(addresses: list[str], concurrency: int, max_tokens: int, duration_s: float, warmup_s: float,
              prompt: list[int], channels_per_address: int = 4) -> dict:
    channels = [grpc.aio.insecure_channel(a, options=[("grpc.max_receive_message_length", 16 << 20)])
                for a in addresses for _ in range(channels_per_address)]
    stubs = [pb_grpc.DisaggServeStub(c) for c in channels]
    counts = {"tokens": 0, "messages": 0, "finished": 0, "errors": 0}
    window = {"on": False}
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + warmup_s + duration_s

    async def one(worker: int) -> None:
        stub = stubs[worker % len(stubs)]
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            request = pb.GenerateRequest(request_id=f"load-{worker}-{n}")
            request.token_ids.ids.extend(prompt)
            request.sampling.max_tokens = max_tokens
            request.sampling.temperature = 0.0
            request.sampling.ignore_eos = True
            try:
                async for msg in stub.Generate(request, timeout=600):
                    if window["on"]:
                        counts["tokens"] += len(msg.token_ids)
                        counts["messages"] += 1
                    if msg.finished and window["on"]:
                        counts["finished"] += 1
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(one(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup_s)
    window["on"] = True
    t0, cpu0 = time.monotonic(), _cpu_s()
    await asyncio.sleep(duration_s)
    window["on"] = False
    seconds, cpu = time.monotonic() - t0, _cpu_s() - cpu0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return {**counts, "seconds": seconds, "client_cpu_s": cpu, "errors_by_code": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.load_client")
    p.add_argument("--addresses", required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--prompt", default="1,2,3,4,5,6,7,8")
    args = p.parse_args(argv)
    out = asyncio.run(run(args.addresses.split(","), args.concurrency, args.max_tokens, args.duration, args.warmup,
                          [int(t) for t in args.prompt.split(",")]))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
