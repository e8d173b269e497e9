"""Rank-to-rank KV transfers through the real side channel and transports, with synthetic
vLLM-shaped caches in one process (no engine): equal and different TP degrees, every CPU
transport, and the failure paths a load can take."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from cluster.kv.connector.metadata import DisaggMetadata, LoadSpec, SourceSpec
from cluster.kv.connector.worker import RankGeometry, RankWorker
from cluster.kv.heads import heads_of_rank

NUM_BLOCKS, BLOCK, HEAD2 = 12, 16, 8  # HEAD2: 2 * head_size (CPU layout keeps K and V per page)
TOTAL_HEADS = 2


def full_cache(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer.{i}": torch.randn(NUM_BLOCKS, TOTAL_HEADS, BLOCK, HEAD2, generator=gen) for i in range(3)}


class Engine:
    """The ranks of one synthetic engine: rank r holds its heads of `full` (zeros if None)."""

    def __init__(self, name: str, tp: int, transport: str, full=None, **settings):
        self.name, self.tp = name, tp
        self.ranks = []
        for r in range(tp):
            heads = heads_of_rank(r, tp, TOTAL_HEADS)
            geometry = RankGeometry(r, tp, TOTAL_HEADS, len(heads))
            worker = RankWorker({"host": "127.0.0.1", "transport": transport, "instance_id": name,
                                 "announce_timeout_s": 1.0, **settings}, geometry)
            source = full if full is not None else {n: torch.zeros_like(t) for n, t in full_cache(0).items()}
            worker.register_kv_caches({n: t[:, heads.start:heads.stop].clone() for n, t in source.items()},
                                      NUM_BLOCKS)
            self.ranks.append(worker)

    def spec(self) -> SourceSpec:
        return SourceSpec(self.name, tuple(w.endpoint() for w in self.ranks))

    def broadcast(self, meta: DisaggMetadata) -> None:
        for w in self.ranks:  # vLLM hands every rank the same metadata
            w.on_metadata(meta)

    def results(self, key: str, timeout_s: float = 10.0) -> tuple[int, int]:
        """(ranks that finished, ranks that failed) for load `key`."""
        finished = failed = 0
        deadline = time.monotonic() + timeout_s
        pending = list(self.ranks)
        while pending and time.monotonic() < deadline:
            for w in list(pending):
                _, recving, bad = w.take_results()
                if key in recving:
                    finished += 1
                    failed += key in bad
                    pending.remove(w)
            time.sleep(0.005)
        return finished, failed

    def shard(self, rank: int, layer: str, block: int) -> torch.Tensor:
        return self.ranks[rank].view.tensors[layer][block]

    def close(self):
        for w in self.ranks:
            w.shutdown()


@pytest.mark.parametrize("transport", ["shm", "tcp", "auto"])
@pytest.mark.parametrize("src_tp, dst_tp", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_every_rank_gets_exactly_its_heads(transport, src_tp, dst_tp):
    full = full_cache(seed=src_tp * 10 + dst_tp)
    src = Engine("prefill-0", src_tp, transport, full)
    dst = Engine("decode-0", dst_tp, transport)
    try:
        src_blocks, dst_blocks = (3, 7, 1), (0, 11, 5)
        src.broadcast(DisaggMetadata(new_holds={"t1": src_blocks}))
        dst.broadcast(DisaggMetadata(loads=[LoadSpec("req-1", "t1", dst_blocks, src.spec(), time.time() + 10)]))
        assert dst.results("req-1") == (dst_tp, 0)
        for d, (layer, (a, b)) in itertools.product(range(dst_tp), itertools.product(full, zip(src_blocks, dst_blocks,
                                                                                                  strict=True))):
            heads = heads_of_rank(d, dst_tp, TOTAL_HEADS)
            assert torch.equal(dst.shard(d, layer, b), full[layer][a, heads.start:heads.stop]), (d, layer, a)
        untouched = [i for i in range(NUM_BLOCKS) if i not in dst_blocks]
        assert all(float(dst.shard(0, "layer.0", i).abs().sum()) == 0.0 for i in untouched)
        sent = sum(w.report().bytes_sent for w in src.ranks)
        received = [w.report() for w in dst.ranks]
        assert sum(r.bytes_received for r in received) == sent == 3 * 3 * TOTAL_HEADS * BLOCK * HEAD2 * 4
    finally:
        src.close()
        dst.close()


def test_a_pull_reports_its_bytes_instead_of_finished_recving():
    src, dst = Engine("decode-0", 2, "shm", full_cache(1)), Engine("decode-1", 2, "shm")
    try:
        src.broadcast(DisaggMetadata(new_holds={"m#s0": (2, 3)}))
        dst.broadcast(DisaggMetadata(pulls=[LoadSpec("pull-0", "m#s0", (4, 5), src.spec(), time.time() + 10)]))
        deadline, results = time.monotonic() + 10, []
        while len(results) < 2 and time.monotonic() < deadline:
            for w in dst.ranks:
                report = w.report()
                if report is not None:
                    results += report.pulls
            time.sleep(0.005)
        assert [r.ok for r in results] == [True, True]
        assert sum(r.nbytes for r in results) == 2 * 3 * TOTAL_HEADS * BLOCK * HEAD2 * 4
        assert all(w.take_results() == (set(), set(), set()) for w in dst.ranks)  # not a request's load
    finally:
        src.close()
        dst.close()


def test_released_holds_report_finished_sending_and_stop_serving():
    src, dst = Engine("prefill-0", 1, "tcp", full_cache(2)), Engine("decode-0", 1, "tcp")
    try:
        src.broadcast(DisaggMetadata(new_holds={"t": (1,)}))
        src.broadcast(DisaggMetadata(dropped_holds=["t"], finished_sending=["req-t"]))
        assert src.ranks[0].take_results() == ({"req-t"}, set(), set())
        dst.broadcast(DisaggMetadata(loads=[LoadSpec("req-t", "t", (0,), src.spec(), time.time() + 10)]))
        assert dst.results("req-t") == (1, 1)  # no longer held: the load fails (policy applies)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("how", ["unknown_hold", "no_source", "source_gone", "deadline_passed"])
def test_failed_loads_are_reported_failed_and_finished(how):
    src, dst = Engine("prefill-0", 1, "shm", full_cache(3)), Engine("decode-0", 1, "shm")
    try:
        spec, deadline = src.spec(), time.time() + 10
        if how == "no_source":
            spec = None
        elif how == "source_gone":
            src.close()
        elif how == "deadline_passed":
            src.broadcast(DisaggMetadata(new_holds={"t": (1,)}))
            deadline = time.time() - 1
        dst.broadcast(DisaggMetadata(loads=[LoadSpec("req", "t", (0,), spec, deadline)]))
        started = time.monotonic()
        assert dst.results("req") == (1, 1)
        assert time.monotonic() - started < 5.0  # every failure is bounded
    finally:
        src.close()
        dst.close()


def test_a_peer_with_another_model_is_refused():
    src = Engine("prefill-0", 1, "shm", full_cache(4))
    other = RankWorker({"host": "127.0.0.1", "transport": "shm", "instance_id": "decode-x"},
                       RankGeometry(0, 1, TOTAL_HEADS, TOTAL_HEADS))
    other.register_kv_caches({"layer.0": torch.zeros(NUM_BLOCKS, TOTAL_HEADS, BLOCK, 2 * HEAD2)}, NUM_BLOCKS)
    try:
        src.broadcast(DisaggMetadata(new_holds={"t": (1,)}))
        other.on_metadata(DisaggMetadata(loads=[LoadSpec("req", "t", (0,), src.spec(), time.time() + 5)]))
        deadline = time.monotonic() + 5
        got = (set(), set(), set())
        while not got[1] and time.monotonic() < deadline:
            got = other.take_results()
            time.sleep(0.005)
        assert got[1] == {"req"} and got[2] == {"req"}
    finally:
        src.close()
        other.shutdown()


def test_the_gpu_check_runs_without_vllm_and_ray_and_says_it_skipped_the_device():
    """`python -m cluster.kv.gpu_check` must run on a bare GPU machine (PyTorch + CuPy only)."""
    import subprocess
    import sys

    from tests import REPO

    code = ("import sys; sys.modules['vllm'] = None; sys.modules['ray'] = None; import runpy; "
            "sys.argv = ['gpu_check', '--quick', '--cpu']; "
            "runpy.run_module('cluster.kv.gpu_check', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layout ok on cpu" in out.stdout and "tcp" in out.stdout and "shm" in out.stdout
    assert "device part SKIPPED" in out.stdout and "CPU checks passed" in out.stdout
    assert "Traceback" not in out.stderr


def push_until_done(src: Engine, dst: Engine, transfer_id: str, steps, reserved, timeout_s: float = 10.0):
    """Runs a layer-wise push: each of `steps` is the list of sequence positions one engine step
    writes; returns every destination rank's push result."""
    from cluster.kv.connector.metadata import PushStep, PushTarget

    target = PushTarget(dst.name, tuple(w.endpoint() for w in dst.ranks), tuple(reserved))
    dst.broadcast(DisaggMetadata(expect_pushes={transfer_id: tuple(reserved)}))
    for positions in steps:
        src.broadcast(DisaggMetadata(pushes=[PushStep(transfer_id, target, tuple(positions), tuple(positions))]))
        for w in src.ranks:
            for layer in list(w.view.layer_names)[:2]:
                w.push_sender.layer_computed(layer)  # the attention layers' hook, mid forward
            w.push_sender.flush_step()  # wait_for_save: the layers no hook announced
    src.broadcast(DisaggMetadata(pushes_done=[(transfer_id, target)]))
    results, deadline = [], time.monotonic() + timeout_s
    while len(results) < dst.tp and time.monotonic() < deadline:
        for w in dst.ranks:
            report = w.report()
            if report is not None:
                results += report.pushes
        time.sleep(0.005)
    return results


@pytest.mark.parametrize("src_tp, dst_tp", [(1, 1), (2, 1), (1, 2)])
def test_layer_wise_push_lands_every_layer_in_the_reserved_blocks(src_tp, dst_tp):
    full = full_cache(seed=7)
    src, dst = Engine("prefill-0", src_tp, "tcp", full), Engine("decode-0", dst_tp, "tcp")
    try:
        reserved = (9, 3, 4)
        # A chunked prefill: positions 0-1 in the first step, 1-2 in the second (block 1 twice).
        results = push_until_done(src, dst, "push-t", [(0, 1), (1, 2)], reserved)
        assert [r.ok for r in results] == [True] * dst_tp, [r.error for r in results]
        for d, layer, pos in itertools.product(range(dst_tp), full, range(3)):
            heads = heads_of_rank(d, dst_tp, TOTAL_HEADS)
            assert torch.equal(dst.shard(d, layer, reserved[pos]), full[layer][pos, heads.start:heads.stop])
    finally:
        src.close()
        dst.close()


def test_a_push_into_unreserved_blocks_is_refused_and_reported_failed():
    src, dst = Engine("prefill-0", 1, "tcp", full_cache(8)), Engine("decode-0", 1, "tcp")
    try:
        from cluster.kv.connector.metadata import PushStep, PushTarget

        target = PushTarget("decode-0", tuple(w.endpoint() for w in dst.ranks), (5, 6))
        dst.broadcast(DisaggMetadata(expect_pushes={"t": (5,)}))  # block 6 was never reserved for it
        src.broadcast(DisaggMetadata(pushes=[PushStep("t", target, (0, 1), (0, 1))]))
        src.ranks[0].push_sender.flush_step()
        src.broadcast(DisaggMetadata(pushes_done=[("t", target)]))
        deadline, results = time.monotonic() + 10, []
        while not results and time.monotonic() < deadline:
            report = dst.ranks[0].report()
            results = report.pushes if report else []
            time.sleep(0.005)
        assert len(results) == 1 and not results[0].ok and "not reserved" in results[0].error
        assert float(dst.shard(0, "layer.0", 6).abs().sum()) == 0.0
    finally:
        src.close()
        dst.close()
