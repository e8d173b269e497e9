"""Multi-turn conversations (Pensieve's workload): history reuse with prefix-aware routing vs
no reuse vs reuse with load-only routing, on the same machine in one run; JSON + PNG.

Workload: `--conversations` chats start at Poisson times (`--rate` per second); each has 4-8
turns (seeded); turn t's prompt is the whole history (the first message, every earlier answer
and user message) plus a new user message, and the next turn is sent when the answer is
complete (after an exponential think time). Answers are greedy with `ignore_eos`, so every setup
sends the same prompts. Setups, each a fresh deployment of the same pools:

- `no-reuse`: prefix caching off (every turn recomputes its history);
- `reuse-load-routing`: prefix caching on, prompts placed by queued tokens only, no sessions;
- `reuse-prefix-routing`: prefix caching on, the prefix-aware cost model and session ids.

Printed and saved: throughput (output tokens/s and turns/s over the makespan), TTFT p50/p90,
and the prompt tokens the engines computed, with ratios against `no-reuse`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time

import numpy as np

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results
from cluster.bench.workload import corpus_token_prompts
from cluster.config import EngineConfig, PoolConfig, PrefixRoutingConfig, RouterConfig, ServeConfig

SETUPS = {
    "no-reuse": (False, "load", False),
    "reuse-load-routing": (True, "load", False),
    "reuse-prefix-routing": (True, "prefix", True),
}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--pools", default="colocated=2", help="e.g. colocated=2 or prefill=2,decode=1")
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--rate", type=float, default=1.0, help="conversations started per second (Poisson)")
    p.add_argument("--min-turns", type=int, default=4)
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--first-len", type=int, default=256, help="tokens of a conversation's first message")
    p.add_argument("--user-len", type=int, default=48, help="tokens of each later user message")
    p.add_argument("--answer-len", type=int, default=32)
    p.add_argument("--think-s", type=float, default=0.2, help="mean pause between an answer and the next turn")
    p.add_argument("--block-size", type=int, default=32, help="vLLM CPU attention takes multiples of 32")
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")


def _pools(spec: str) -> tuple[PoolConfig, ...]:
    pools = []
    for part in spec.split(","):
        role, _, n = part.partition("=")
        pools.append(PoolConfig(role.strip(), int(n)))
    return tuple(pools)


@dataclasses.dataclass
class Conversation:
    index: int
    turns: int
    start_s: float
    first: list[int]
    users: list[list[int]]
    think_s: list[float]


def make_workload(args, tokenizer) -> list[Conversation]:
    rng = np.random.default_rng(args.seed)
    n = args.conversations
    starts = np.cumsum(rng.exponential(1.0 / args.rate, n)) - 0.0
    turns = rng.integers(args.min_turns, args.max_turns + 1, n)
    texts = corpus_token_prompts(tokenizer, n * (1 + args.max_turns), max(args.first_len, args.user_len),
                                 seed=args.seed)
    convs = []
    for i in range(n):
        block = texts[i * (1 + args.max_turns):(i + 1) * (1 + args.max_turns)]
        convs.append(Conversation(i, int(turns[i]), float(starts[i]), list(block[0][:args.first_len]),
                                  [list(t[:args.user_len]) for t in block[1:]],
                                  [float(x) for x in rng.exponential(args.think_s, args.max_turns)]))
    return convs


async def _converse(client, conv: Conversation, args, t0: float, sessions: bool, records: list) -> None:
    await asyncio.sleep(max(0.0, t0 + conv.start_s - time.perf_counter()))
    prompt = list(conv.first)
    for turn in range(conv.turns):
        sent = time.perf_counter()
        first = None
        answer: list[int] = []
        async for msg in client.stream(prompt, max_tokens=args.answer_len, temperature=0.0, ignore_eos=True,
                                       session_id=f"c{conv.index}" if sessions else ""):
            if msg.token_ids and first is None:
                first = time.perf_counter()
            answer.extend(msg.token_ids)
        records.append({"conversation": conv.index, "turn": turn, "prompt_tokens": len(prompt),
                        "output_tokens": len(answer), "ttft_s": (first or time.perf_counter()) - sent,
                        "done_s": time.perf_counter() - t0})
        if turn + 1 < conv.turns:
            await asyncio.sleep(conv.think_s[turn])
            prompt = prompt + answer + conv.users[turn]


async def _run_setup(label: str, model: str, args, convs) -> dict:
    import ray

    from cluster.client import AsyncClient, status_to_dict
    from cluster.entrypoints.launcher import start_cluster

    caching, policy, sessions = SETUPS[label]
    config = ServeConfig(
        engine=EngineConfig(model=model, cpu_kv_cache_gib=args.kv_cache_gib, block_size=args.block_size,
                            max_model_len=1024, enable_prefix_caching=caching),
        router=RouterConfig(host="127.0.0.1", port=0), pools=_pools(args.pools),
        prefix_routing=PrefixRoutingConfig(policy=policy))
    cluster = await start_cluster(config)
    client = AsyncClient(f"127.0.0.1:{cluster.port}", timeout=600)
    try:
        # Warm-up: one short request per instance's worth, not counted.
        await asyncio.gather(*[client.generate(list(c.first[:32]), max_tokens=4, temperature=0.0) for c in convs[:4]])
        before = status_to_dict(await client.cluster_status())
        records: list[dict] = []
        t0 = time.perf_counter()
        await asyncio.gather(*[_converse(client, c, args, t0, sessions, records) for c in convs])
        makespan = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # the last load reports reach the scheduler
        after = status_to_dict(await client.cluster_status())
    finally:
        await client.close()
        await cluster.stop()
        ray.shutdown()

    def computed(status):
        return sum(int(i.get("prompt_tokens_computed", 0)) for i in status["instances"] if i["role"] != "decode")

    ttft = np.array([r["ttft_s"] for r in records]) * 1000
    out_tokens = sum(r["output_tokens"] for r in records)
    result = {
        "label": label, "prefix_caching": caching, "routing": policy, "sessions": sessions,
        "turns": len(records), "makespan_s": makespan,
        "output_tokens_per_s": out_tokens / makespan, "turns_per_s": len(records) / makespan,
        "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p90_ms": float(np.percentile(ttft, 90)),
        "prompt_tokens_sent": sum(r["prompt_tokens"] for r in records),
        "prompt_tokens_computed": computed(after) - computed(before),
        "routing_decisions": (after.get("routing") or {}).get("decisions", {}),
        "records": records,
    }
    print(f"{label}: {result['turns_per_s']:.2f} turns/s, {result['output_tokens_per_s']:.1f} tok/s, TTFT p50 "
          f"{result['ttft_p50_ms']:.0f} ms p90 {result['ttft_p90_ms']:.0f} ms, computed "
          f"{result['prompt_tokens_computed']} of {result['prompt_tokens_sent']} prompt tokens",
          file=sys.stderr, flush=True)
    return result


def _plot(runs: dict, path: str) -> None:
    plt = pyplot()
    labels = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in ((axes[0], "output_tokens_per_s", "throughput (output tokens/s)"),
                           (axes[1], "ttft_p50_ms", "TTFT p50 (ms)"),
                           (axes[2], "prompt_tokens_computed", "prompt tokens computed")):
        ax.bar(range(len(labels)), [runs[label][key] for label in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        ax.set_title(title)
    fig.suptitle("multi-turn conversations: prefix reuse and routing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    from cluster.models.demo import demo_target
    from cluster.models.tokenizer import load_serving_tokenizer

    model = args.model or demo_target()
    convs = make_workload(args, load_serving_tokenizer(model))
    runs = {label: asyncio.run(_run_setup(label, model, args, convs)) for label in SETUPS}
    base = runs["no-reuse"]
    for label, r in runs.items():
        r["throughput_vs_no_reuse"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        r["ttft_p50_vs_no_reuse"] = r["ttft_p50_ms"] / base["ttft_p50_ms"]
        print(f"{label:22s} throughput x{r['throughput_vs_no_reuse']:.2f}  TTFT p50 x{r['ttft_p50_vs_no_reuse']:.2f}"
              f"  (p50 {r['ttft_p50_ms']:.0f} ms, p90 {r['ttft_p90_ms']:.0f} ms)  computed "
              f"{r['prompt_tokens_computed']}/{r['prompt_tokens_sent']} prompt tokens  decisions "
              f"{r['routing_decisions']}")
    results = {"study": "prefix-reuse", "config": vars(args) | {"model": model}, "runs": runs}
    path = write_results(args.out, "prefix-reuse", results)
    _plot(runs, str(path.with_suffix(".png")))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
