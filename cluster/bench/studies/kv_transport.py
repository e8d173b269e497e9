"""KV transport bandwidth between engine ranks: the real side channel, transports and head
re-splitting (cluster/kv/), with synthetic vLLM-shaped caches in separate processes (no model),
for rank pairs TP1->TP1, TP2->TP2, TP2->TP1 and TP1->TP2, at 64 KB .. 256 MB, against a plain
memory copy of the same bytes in one process (the ceiling) and Ray's object store (put in one
process, get in another). Also the time to ready of a real engine instance by TP degree.
Same run, printed ratios, JSON + PNG."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time

import numpy as np
import ray
import torch

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results
from cluster.config import EngineConfig, PoolConfig
from cluster.entrypoints.deployment import spawn_worker
from cluster.kv.connector.metadata import DisaggMetadata, LoadSpec, SourceSpec
from cluster.kv.connector.worker import RankGeometry, RankWorker
from cluster.kv.heads import heads_of_rank
from cluster.models.demo import demo_target

LAYERS, HEADS, BLOCK, HEAD2 = 4, 2, 16, 128  # 64 KiB per block over all layers and heads (float32)
BLOCK_BYTES = LAYERS * HEADS * BLOCK * HEAD2 * 4


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes-mb", default="0.0625,0.25,1,4,16,64,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--transports", default="shm,tcp", help="comma list of: shm, tcp")
    p.add_argument("--pairs", default="1-1,2-2,2-1,1-2", help="source TP - destination TP")
    p.add_argument("--engines", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a real engine instance's start-up by TP degree (TP1, TP2)")
    p.add_argument("--quick", action="store_true", help="1, 16 and 64 MB, 3 repeats")
    p.add_argument("--out", default="bench-results")


# ---------------------------------------------------------------- one synthetic engine per process


def _host(conn, name: str, tp: int, transport: str, num_blocks: int, seed: int) -> None:
    """Runs the ranks of one synthetic engine and answers the parent's commands."""
    torch.manual_seed(seed)
    ranks = []
    for r in range(tp):
        heads = heads_of_rank(r, tp, HEADS)
        worker = RankWorker({"host": "127.0.0.1", "transport": transport, "instance_id": name},
                            RankGeometry(r, tp, HEADS, len(heads)))
        worker.register_kv_caches({f"layer.{i}": torch.randn(num_blocks, len(heads), BLOCK, HEAD2)
                                   for i in range(LAYERS)}, num_blocks)
        ranks.append(worker)
    conn.send(SourceSpec(name, tuple(w.endpoint() for w in ranks)))
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            break
        if cmd == "meta":
            for w in ranks:
                w.on_metadata(args[0])
            conn.send(True)
        elif cmd == "load":
            spec, key = args
            for w in ranks:
                w.results_ready.clear()
            started = time.perf_counter()
            for w in ranks:
                w.on_metadata(DisaggMetadata(loads=[spec]))
            pending, ok = set(range(tp)), True
            while pending:
                for i in list(pending):
                    ranks[i].results_ready.wait(60)
                    ranks[i].results_ready.clear()
                    _, done, failed = ranks[i].take_results()
                    if key in done:
                        pending.discard(i)
                        ok &= key not in failed
            conn.send((time.perf_counter() - started, ok))
    for w in ranks:
        w.shutdown()


class _Engine:
    def __init__(self, name: str, tp: int, transport: str, num_blocks: int, seed: int):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_host, args=(child, name, tp, transport, num_blocks, seed), daemon=True)
        self.proc.start()
        self.spec: SourceSpec = self.conn.recv()

    def call(self, *cmd):
        self.conn.send(cmd)
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(30)


# ---------------------------------------------------------------- baselines


def _memcpy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.randn(max(1, nbytes // 4))
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: pages faulted in, thread pool awake
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@ray.remote(num_cpus=0)
class _ObjectSource:
    """Holds the bytes a transfer would send; `put` copies them into the object store, as a
    source that sends its KV through Ray must."""

    def prepare(self, nbytes: int) -> None:
        self.data = np.ones(nbytes, dtype=np.uint8)

    def put(self):
        return [ray.put(self.data)]


def _object_store_seconds(source, nbytes: int, repeats: int) -> float:
    """Put in the source process, get and copy out in this one: both sides' copies are timed,
    as they are for the transports (gather at the source, scatter at the destination)."""
    ray.get(source.prepare.remote(nbytes))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        ref = ray.get(source.put.remote())[0]
        data = ray.get(ref)
        _ = np.array(data, copy=True)  # the bytes land in this process's memory, as a transfer's do
        times.append(time.perf_counter() - start)
        del data, ref
    return statistics.median(times[1:])


def _engine_start_seconds(tp: int) -> float:
    """A real colocated engine (the demo model) from spawn to ready."""
    config = EngineConfig(model=demo_target(), max_model_len=1024, dtype="float32", cpu_kv_cache_gib=0.25)
    start = time.perf_counter()
    actor = spawn_worker(config, PoolConfig("colocated", 1, 0.5, tensor_parallel_size=tp), f"ready-tp{tp}", None)
    ray.get(actor.info.remote(), timeout=900)
    elapsed = time.perf_counter() - start
    ray.get(actor.shutdown.remote(), timeout=60)
    ray.kill(actor)
    return elapsed


# ---------------------------------------------------------------- the study


def run(args) -> dict:
    sizes = [0.25, 1.0, 16.0, 64.0] if args.quick else [float(s) for s in args.sizes_mb.split(",")]
    repeats = 3 if args.quick else args.repeats
    pairs = [tuple(int(x) for x in p.split("-")) for p in args.pairs.split(",")]
    num_blocks = int(max(sizes) * (1 << 20)) // BLOCK_BYTES + 1
    rows, ready = [], {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        objects = _ObjectSource.remote()
        baselines = {}
        for size in sizes:
            nbytes = max(1, int(size * (1 << 20)) // BLOCK_BYTES) * BLOCK_BYTES
            baselines[size] = (_memcpy_seconds(nbytes, repeats), _object_store_seconds(objects, nbytes, repeats))
        for transport in args.transports.split(","):
            for src_tp, dst_tp in pairs:
                src = _Engine("src", src_tp, transport, num_blocks, seed=1)
                dst = _Engine("dst", dst_tp, transport, num_blocks, seed=2)
                try:
                    for size in sizes:
                        n = max(1, int(size * (1 << 20)) // BLOCK_BYTES)
                        blocks = tuple(range(n))
                        times = []
                        for r in range(repeats + 1):  # the first round warms up (pools, connections)
                            tid = f"{transport}-{src_tp}-{dst_tp}-{size}-{r}"
                            src.call("meta", DisaggMetadata(new_holds={tid: blocks}))
                            spec = LoadSpec(tid, tid, blocks, src.spec, time.time() + 120)
                            seconds, ok = dst.call("load", spec, tid)
                            if not ok:
                                raise RuntimeError(f"transfer {tid} failed")
                            times.append(seconds)
                            src.call("meta", DisaggMetadata(dropped_holds=[tid]))
                        rows.append(_row(transport, src_tp, dst_tp, size, n * BLOCK_BYTES,
                                         statistics.median(times[1:]), *baselines[size]))
                finally:
                    src.stop()
                    dst.stop()
        if args.engines:
            for tp in (1, 2):
                ready[f"tp{tp}"] = _engine_start_seconds(tp)
                print(f"engine TP{tp} ready in {ready[f'tp{tp}']:.1f} s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    return {"study": "kv-transport", "config": vars(args), "block_bytes": BLOCK_BYTES, "rows": rows,
            "engine_ready_s": ready}


def _row(transport, src_tp, dst_tp, size, nbytes, seconds, memcpy_s, object_s) -> dict:
    pairs = max(src_tp, dst_tp)  # rank pairs that move bytes at once
    row = {"transport": transport, "pair": f"TP{src_tp}->TP{dst_tp}", "size_mb": size, "bytes": nbytes,
           "seconds": seconds, "latency_ms": 1000 * seconds,
           "total_gbps": nbytes / seconds / 1e9, "per_pair_gbps": nbytes / pairs / seconds / 1e9,
           "memcpy_gbps": nbytes / memcpy_s / 1e9, "object_store_gbps": nbytes / object_s / 1e9}
    row["ratio_over_memcpy"] = row["total_gbps"] / row["memcpy_gbps"]
    row["ratio_over_object_store"] = row["total_gbps"] / row["object_store_gbps"]
    print(f"{transport:>4} {row['pair']:>10} {size:>8.4g} MB: {row['total_gbps']:6.2f} GB/s total "
          f"({row['per_pair_gbps']:5.2f}/pair, {row['latency_ms']:8.3f} ms)  memcpy {row['memcpy_gbps']:6.2f}  "
          f"object store {row['object_store_gbps']:6.2f}  x memcpy {row['ratio_over_memcpy']:.2f}",
          file=sys.stderr, flush=True)
    return row


def plot(results: dict, path) -> None:
    plt = pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in dict.fromkeys((r["transport"], r["pair"]) for r in rows):
        rs = [r for r in rows if (r["transport"], r["pair"]) == key]
        ax.plot([r["size_mb"] for r in rs], [r["total_gbps"] for r in rs], "o-", label=f"{key[0]} {key[1]}")
    base = [r for r in rows if (r["transport"], r["pair"]) == (rows[0]["transport"], rows[0]["pair"])]
    ax.plot([r["size_mb"] for r in base], [r["memcpy_gbps"] for r in base], "s--", color="k", label="memcpy")
    ax.plot([r["size_mb"] for r in base], [r["object_store_gbps"] for r in base], "x:", color="gray",
            label="Ray object store")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV payload (MB)")
    ax.set_ylabel("GB/s")
    ax.set_title("KV transfer between engine ranks (separate processes)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    results = run(args)
    path = write_results(args.out, "kv-transport", results)
    plot(results, path.with_suffix(".png"))
    print(f"{'transport':>9} {'pair':>10} {'MB':>8} {'GB/s':>7} {'/pair':>7} {'ms':>9} {'memcpy':>7} "
          f"{'objstore':>8} {'xmemcpy':>8} {'xobj':>6}")
    for r in results["rows"]:
        print(f"{r['transport']:>9} {r['pair']:>10} {r['size_mb']:>8.4g} {r['total_gbps']:>7.2f} "
              f"{r['per_pair_gbps']:>7.2f} {r['latency_ms']:>9.3f} {r['memcpy_gbps']:>7.2f} "
              f"{r['object_store_gbps']:>8.2f} {r['ratio_over_memcpy']:>8.2f} {r['ratio_over_object_store']:>6.2f}")
    for name, seconds in results["engine_ready_s"].items():
        print(f"engine {name} ready in {seconds:.1f} s")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
