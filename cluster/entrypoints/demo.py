"""`make demo`: demo models, a local cluster, completions streamed over gRPC, a summary."""

from __future__ import annotations

import asyncio
import sys
import time

import ray

from cluster.client import AsyncClient, status_to_dict
from cluster.config import EngineConfig, PoolConfig, RouterConfig, ServeConfig, SpecConfig
from cluster.entrypoints.launcher import start_cluster
from cluster.entrypoints.status_format import format_status_table
from cluster.models.demo import build_demo_models

DEMO_PROMPTS = [
    "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n",
    "    def __repr__(self):\n",
    "with open(path) as f:\n",
    "try:\n    import json\nexcept ImportError:\n",
    "if __name__ == '__main__':\n",
]


async def _stream_one(client, prompt: str, max_tokens: int, echo: bool, **sampling) -> dict:
    start = time.perf_counter()
    first = None
    tokens, last = 0, None
    if echo:
        sys.stdout.write(f"\n--- prompt ---\n{prompt}--- completion (streamed) ---\n")
    async for msg in client.stream(prompt, max_tokens=max_tokens, **(sampling or {"temperature": 0.0})):
        if msg.token_ids and first is None:
            first = time.perf_counter() - start
        tokens += len(msg.token_ids)
        if echo:
            sys.stdout.write(msg.text)
            sys.stdout.flush()
        last = msg
    if echo:
        sys.stdout.write("\n")
    return {"ttft": first or 0.0, "e2e": time.perf_counter() - start, "tokens": tokens,
            "served_by": list(last.served_by), "finish": last.finish_reason}


async def _migrate_mid_stream(client, prompt: str, max_tokens: int = 160) -> dict:
    """Streams one greedy request, live-migrates it to the other decode instance after a few
    tokens, then runs it again unmigrated: the two token streams must be identical."""
    request_id = f"demo-migration-{time.monotonic_ns()}"
    tokens: list[int] = []
    record: dict = {}

    async def consume():
        async for msg in client.stream(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                       request_id=request_id):
            tokens.extend(msg.token_ids)

    stream = asyncio.ensure_future(consume())
    while len(tokens) < 24 and not stream.done():
        await asyncio.sleep(0.002)
    if not stream.done():
        record = await client.migrate(request_id)
    await stream
    plain = await client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return {"migration": record, "identical": plain.token_ids == tokens, "tokens": len(tokens)}


async def _demo(colocated: int, port: int, speculative: bool) -> None:
    models = build_demo_models()
    if colocated:
        pools = (PoolConfig("colocated", colocated),)
    else:  # the full system: a prefill pool and a decode pool, KV moving between them
        pools = (PoolConfig("prefill", 1, resource="disagg_prefill"),
                 PoolConfig("decode", 2, resource="disagg_decode"))
    config = ServeConfig(
        engine=EngineConfig(model=str(models / "target"), cpu_kv_cache_gib=0.25, dtype="float32"),
        router=RouterConfig(host="127.0.0.1", port=port),
        pools=pools,
        worker_logs_to_driver=False,
        spec=SpecConfig(draft_model=str(models / "draft"), k=3, extra=1) if speculative else SpecConfig(),
    )
    mode = f"{colocated} colocated instance(s)" if colocated else "1 prefill + 2 decode instances"
    print(f"demo: {mode}, speculative decoding with TETRIS {'on' if speculative else 'off'}", flush=True)
    cluster = await start_cluster(config)
    client = AsyncClient(f"127.0.0.1:{cluster.port}")
    try:
        info = await client.model_info()
        print(f"model {info.model}: max length {info.max_model_len}, vocabulary {info.vocab_size}")
        # A tiny model's greedy text loops; a seeded sample reads more like code.
        results = [await _stream_one(client, DEMO_PROMPTS[0], 96, echo=True, temperature=0.8, top_p=0.95, seed=7)]
        print(f"\nnow {len(DEMO_PROMPTS) * 2} concurrent streams...", flush=True)
        start = time.perf_counter()
        results += await asyncio.gather(*[_stream_one(client, p, 64, echo=False) for p in DEMO_PROMPTS * 2])
        wall = time.perf_counter() - start
        migrated = None
        if not colocated:
            print("\nlive-migrating a streaming request between the decode instances...", flush=True)
            migrated = await _migrate_mid_stream(client, DEMO_PROMPTS[1])
        status = status_to_dict(await client.cluster_status())
    finally:
        await client.close()
        await cluster.stop()
        ray.shutdown()
    burst = results[1:]
    tokens = sum(r["tokens"] for r in burst)
    by_instance: dict[str, int] = {}
    for r in results:
        for inst in r["served_by"]:
            by_instance[inst] = by_instance.get(inst, 0) + 1
    print("\n=============== demo summary ===============")
    print(f"requests completed     : {len(results)}")
    print(f"burst of {len(burst)} streams    : {tokens} tokens in {wall:.2f}s = {tokens / wall:.1f} tok/s")
    print(f"mean TTFT (burst)      : {1000 * sum(r['ttft'] for r in burst) / len(burst):.1f} ms")
    print(f"mean E2E (burst)       : {1000 * sum(r['e2e'] for r in burst) / len(burst):.1f} ms")
    print(f"requests per instance  : {by_instance}")
    if migrated is not None:
        m = migrated["migration"]
        if m.get("state") == "committed":
            print(f"live migration         : {m['source']} -> {m['target']}, {m['stages']} stage(s), "
                  f"{m['blocks_copied']} blocks, {m['tokens_moved']} tokens of KV moved, downtime "
                  f"{1000 * (m['downtime_s'] or 0):.1f} ms; stream identical to an unmigrated run: "
                  f"{'yes' if migrated['identical'] else 'NO'}")
            order = ("stop", "catch_up", "tail", "commit", "first_token")
            phases = ", ".join(f"{k} {1000 * m['phases_s'][k]:.1f}" for k in order if k in m.get("phases_s", {}))
            print(f"  downtime by phase, ms: {phases}")
        else:
            print(f"live migration         : {m.get('state', 'not started')} {m.get('reason', '')}")
    print(format_status_table(status))


def run_demo(colocated: int = 0, port: int = 0, speculative: bool = True) -> int:
    asyncio.run(_demo(colocated, port, speculative))
    return 0
