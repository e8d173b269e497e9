"""The GPU check: the project's KV block layout, side channel and NCCL transport on a bare GPU
machine (PyTorch, CuPy and NCCL only: no vLLM, no Ray), in minutes.

    python -m cluster.kv.gpu_check            # or: make gpu-check

It builds vLLM-shaped paged KV caches (flash-attention layout [2, blocks, block_size, heads,
head_size]) on the GPU and checks, byte for byte:
1. gather/scatter of whole blocks and of KV-head ranges (transfers between TP degrees);
2. the NCCL transport over the side channel: with two GPUs a real 2-rank pair (rank 0 serving,
   rank 1 pulling, as two engines' ranks do), with one GPU a 1-rank loopback communicator;
and prints bandwidth against a device-to-device copy of the same bytes.
Without CUDA (CI) it runs the same layout and side-channel code on the CPU (shm and tcp
transports) and says that it skipped the device part. Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from cluster.kv.channel import RankClient, RankServer
from cluster.kv.layout import HeadRange, KVCacheView
from cluster.kv.transports import FetchRequest, make_transport

LAYERS, HEADS, BLOCK, HEAD_SIZE = 4, 8, 16, 128


def _caches(num_blocks: int, device: str, dtype: torch.dtype, gpu_layout: bool, seed: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (2, num_blocks, BLOCK, HEADS, HEAD_SIZE) if gpu_layout else (num_blocks, HEADS, BLOCK, 2 * HEAD_SIZE)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, generator=gen).to(dtype).to(device)
            for i in range(LAYERS)}


class _Source:
    """A SourceContext over one cache: what a rank serving held blocks provides."""

    def __init__(self, view: KVCacheView, held: dict[str, list[int]]):
        self.view, self._held, self.sent = view, held, 0

    def held_blocks(self, transfer_id: str, timeout_s: float) -> list[int]:
        return list(self._held[transfer_id])

    def count_sent(self, nbytes: int) -> None:
        self.sent += nbytes


def _same(a: KVCacheView, a_blocks, b: KVCacheView, b_blocks, heads_a=None, heads_b=None) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.gather(a_blocks, heads_a), b.gather(b_blocks, heads_b),
                                                  strict=True))


def check_layout(device: str, dtype: torch.dtype, gpu_layout: bool) -> None:
    src = KVCacheView(_caches(32, device, dtype, gpu_layout, 1), 32, HEADS)
    dst = KVCacheView(_caches(32, device, dtype, gpu_layout, 2), 32, HEADS)
    dst.scatter([5, 0, 9], src.gather([1, 2, 3]))
    assert _same(src, [1, 2, 3], dst, [5, 0, 9]), "whole-block gather/scatter changed bytes"
    half = HeadRange(HEADS // 2, HEADS // 2)
    dst.scatter([7], src.gather([4], half), HeadRange(0, HEADS // 2))
    assert _same(src, [4], dst, [7], half, HeadRange(0, HEADS // 2)), "head-range copy changed bytes"
    print(f"  layout ok on {device} ({'flash' if gpu_layout else 'cpu'} layout, {dtype}): blocks and head ranges")


def check_channel(transport: str, device: str, dtype: torch.dtype, gpu_layout: bool, sizes_mb, repeats: int,
                  dst_device: str | None = None) -> list[dict]:
    """Pull held blocks from a serving 'rank' to another through the side channel."""
    bytes_per_block = LAYERS * 2 * BLOCK * HEADS * HEAD_SIZE * torch.empty((), dtype=dtype).element_size()
    num_blocks = max(2, int(max(sizes_mb) * (1 << 20)) // bytes_per_block + 1)
    src = KVCacheView(_caches(num_blocks, device, dtype, gpu_layout, 3), num_blocks, HEADS)
    dst = KVCacheView(_caches(num_blocks, dst_device or device, dtype, gpu_layout, 4), num_blocks, HEADS)
    held: dict[str, list[int]] = {}
    source_transport = make_transport(transport, "127.0.0.1", "gpu-check/src")
    dest_transport = make_transport(transport, "127.0.0.1", "gpu-check/dst")
    server = RankServer(source_transport.source_handlers(_Source(src, held)), host="127.0.0.1")
    client = RankClient(server.endpoint)
    rows = []
    try:
        for size in sizes_mb:
            n = max(1, int(size * (1 << 20)) // bytes_per_block)
            blocks = list(range(n))
            held["t"] = blocks[::-1]
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                dest_transport.fetch(client, FetchRequest("t", blocks, None, None, 60.0), dst)
                if dst.device.type == "cuda":
                    torch.cuda.synchronize(dst.device)
                times.append(time.perf_counter() - start)
            assert _same(src, blocks[::-1], dst, blocks), f"{transport}: bytes differ after the transfer"
            nbytes = n * bytes_per_block
            seconds = statistics.median(times[1:])
            copy_s = _copy_seconds(nbytes, dst.device, repeats)
            rows.append({"transport": transport, "mb": nbytes / (1 << 20), "gbps": nbytes / seconds / 1e9,
                         "copy_gbps": nbytes / copy_s / 1e9})
            row = rows[-1]
            print(f"  {transport:>4} {nbytes / (1 << 20):8.2f} MB: {row['gbps']:7.2f} GB/s  "
                  f"(device copy {row['copy_gbps']:7.2f} GB/s, ratio {row['gbps'] / row['copy_gbps']:.2f})")
    finally:
        client.close()
        server.close()
        source_transport.close()
        dest_transport.close()
    return rows


def check_nccl_loopback(dtype: torch.dtype, sizes_mb, repeats: int) -> None:
    from cluster.kv.transports.nccl import loopback

    bytes_per_block = LAYERS * 2 * BLOCK * HEADS * HEAD_SIZE * torch.empty((), dtype=dtype).element_size()
    num_blocks = max(2, 2 * (int(max(sizes_mb) * (1 << 20)) // bytes_per_block) + 2)
    view = KVCacheView(_caches(num_blocks, "cuda", dtype, True, 5), num_blocks, HEADS)
    for size in sizes_mb:
        n = max(1, int(size * (1 << 20)) // bytes_per_block)
        src, dst = list(range(n)), list(range(n, 2 * n))
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            loopback(view, src, dst)
            times.append(time.perf_counter() - start)
        assert _same(view, src, view, dst), "NCCL loopback changed bytes"
        nbytes = n * bytes_per_block
        seconds, copy_s = statistics.median(times[1:]), _copy_seconds(nbytes, view.device, repeats)
        print(f"  nccl loopback {nbytes / (1 << 20):8.2f} MB: {nbytes / seconds / 1e9:7.2f} GB/s  "
              f"(device copy {nbytes / copy_s / 1e9:7.2f} GB/s)")


def _copy_seconds(nbytes: int, device: torch.device, repeats: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.kv.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", default="4,64,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 and 16 MB, 2 repeats")
    p.add_argument("--cpu", action="store_true", help="the CPU mode even where CUDA is available")
    args = p.parse_args(argv)
    sizes = [1.0, 16.0] if args.quick else [float(s) for s in args.sizes_mb.split(",")]
    repeats = 2 if args.quick else args.repeats
    started = time.monotonic()
    cuda = torch.cuda.is_available() and not args.cpu
    print(f"torch {torch.__version__}, CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    print("CPU part: layout and side channel (shm, tcp)")
    check_layout("cpu", torch.float32, gpu_layout=False)
    for transport in ("shm", "tcp"):
        check_channel(transport, "cpu", torch.float32, False, sizes, repeats)
    if not cuda:
        print("device part SKIPPED: no CUDA device here (torch.cuda.is_available() is False or --cpu); "
              "run this on a GPU machine to check NCCL")
        print(f"gpu-check: CPU checks passed in {time.monotonic() - started:.1f} s")
        return 0
    print(f"device part: {torch.cuda.get_device_name(0)}")
    check_layout("cuda", torch.bfloat16, gpu_layout=True)
    if torch.cuda.device_count() >= 2:
        print("  NCCL pair: cuda:0 serves, cuda:1 pulls")
        check_channel("nccl", "cuda:0", torch.bfloat16, True, sizes, repeats, dst_device="cuda:1")
    else:
        print("  one GPU: NCCL through a 1-rank loopback communicator")
        check_nccl_loopback(torch.bfloat16, sizes, repeats)
    print(f"gpu-check: all checks passed in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
