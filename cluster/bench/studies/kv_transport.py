"""KV transport bandwidth: moving 1 MB .. 256 MB of KV blocks between two worker processes
through the real agent + transport path, against a plain memory copy of the same bytes in one
process (the ceiling on this machine). Same run, printed ratio, JSON + PNG."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import ray
import torch

from cluster.bench.plots import pyplot
from cluster.bench.studies.common import write_results
from cluster.kv.agent import KVTransferAgent
from cluster.kv.transports import SourceRef, make_transport

BLOCK_BYTES = 1 << 20  # 1 MiB blocks keep the block count small at every size
LAYERS = 4


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes-mb", default="1,4,16,64,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--transports", default="shm,ray", help="comma list of: shm, ray, nccl")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the nccl transport")
    p.add_argument("--out", default="bench-results")


def _caches(num_blocks: int, device: str) -> dict[str, torch.Tensor]:
    per_layer = BLOCK_BYTES // LAYERS // 4  # float32 elements per block per layer
    return {f"layer.{i}": torch.randn(num_blocks, per_layer, device=device)
            for i in range(LAYERS)}


class _Endpoint:
    """A process with a synthetic KV cache and a real KVTransferAgent (no engine)."""

    def __init__(self, name: str, num_blocks: int, transport: str, device: str):
        self.name = name
        self.agent = KVTransferAgent(name, make_transport(transport, name), timeout_s=120)
        self.agent.register_kv_caches(_caches(num_blocks, device), num_blocks, block_size=1)

    def hold(self, transfer_id: str, blocks: list[int]) -> None:
        self.agent.hold(transfer_id, transfer_id, blocks, num_tokens=len(blocks))

    def kv_export(self, transfer_id: str):
        return self.agent.export(transfer_id)

    def kv_release(self, transfer_id: str) -> bool:
        return self.agent.release(transfer_id)

    def kv_export_shm(self, transfer_id: str):
        return self.agent.export_shm(transfer_id)

    def kv_nccl_join(self, key, unique_id, signature):
        return self.agent.nccl_join(key, unique_id, signature)

    def kv_nccl_send(self, key, transfer_id):
        return self.agent.nccl_send(key, transfer_id)

    def fetch(self, source_name: str, source, transfer_id: str, blocks: list[int]) -> float:
        start = time.perf_counter()
        self.agent.transport.fetch(SourceRef(source_name, source), transfer_id, self.agent.cache,
                                   blocks, 120)
        return time.perf_counter() - start


def _memcpy_seconds(nbytes: int, device: str, repeats: int) -> float:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> dict:
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    max_blocks = max(sizes) * (1 << 20) // BLOCK_BYTES
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    gpus = 1 if args.device.startswith("cuda") else 0
    actor = ray.remote(num_cpus=0, num_gpus=gpus / 2 if gpus else 0, max_concurrency=4)(_Endpoint)
    rows = []
    try:
        for transport in args.transports.split(","):
            src = actor.remote("src", max_blocks, transport, args.device)
            dst = actor.remote("dst", max_blocks, transport, args.device)
            for size in sizes:
                blocks = list(range(size * (1 << 20) // BLOCK_BYTES))
                times = []
                for r in range(args.repeats + 1):  # the first round warms up (pools, NCCL links)
                    tid = f"{transport}-{size}-{r}"
                    ray.get(src.hold.remote(tid, blocks))
                    times.append(ray.get(dst.fetch.remote("src", src, tid, blocks)))
                    ray.get(src.kv_release.remote(tid))
                nbytes = len(blocks) * BLOCK_BYTES
                transfer_s = statistics.median(times[1:])
                copy_s = _memcpy_seconds(nbytes, args.device, args.repeats)
                row = {"transport": transport, "size_mb": size, "bytes": nbytes,
                       "transport_s": transfer_s, "memcpy_s": copy_s,
                       "transport_gbps": nbytes / transfer_s / 1e9,
                       "memcpy_gbps": nbytes / copy_s / 1e9}
                row["ratio_transport_over_memcpy"] = row["transport_gbps"] / row["memcpy_gbps"]
                rows.append(row)
                print(f"{size:>5} MB  {transport}: {row['transport_gbps']:7.2f} GB/s   memcpy: "
                      f"{row['memcpy_gbps']:7.2f} GB/s   "
                      f"ratio {row['ratio_transport_over_memcpy']:.3f}",
                      file=sys.stderr, flush=True)
            for a in (src, dst):
                ray.kill(a)
    finally:
        ray.shutdown()
    return {"study": "kv-transport", "config": vars(args), "rows": rows}


def plot(results: dict, path) -> None:
    plt = pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for transport in dict.fromkeys(r["transport"] for r in rows):
        rs = [r for r in rows if r["transport"] == transport]
        ax.plot([r["size_mb"] for r in rs], [r["transport_gbps"] for r in rs], "o-",
                label=f"{transport} transport")
    first = [r for r in rows if r["transport"] == rows[0]["transport"]]
    ax.plot([r["size_mb"] for r in first], [r["memcpy_gbps"] for r in first], "s--",
            label="memcpy (same process)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV payload (MB)")
    ax.set_ylabel("GB/s")
    ax.set_title("KV transfer bandwidth between worker processes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    results = run(args)
    path = write_results(args.out, "kv-transport", results)
    plot(results, path.with_suffix(".png"))
    print(f"{'transport':>9} {'size':>8} {'GB/s':>8} {'memcpy GB/s':>12} {'ratio':>7}")
    for r in results["rows"]:
        print(f"{r['transport']:>9} {r['size_mb']:>6}MB {r['transport_gbps']:>8.2f} "
              f"{r['memcpy_gbps']:>12.2f} {r['ratio_transport_over_memcpy']:>7.3f}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
