"""`disagg-serve profile`: measures what one engine instance costs on this hardware and writes
a profile file (cluster/planner/profile.py).

The engine is a real vLLM engine built exactly as a worker builds it (`vllm_adapter.build_engine`
from an `EngineConfig`), inside a Ray actor with the resources a pool instance gets, so threads
and memory match the serving cluster. Measured, each step timed with perf_counter:

* prefill: one prompt of n tokens per step, over a range of n (one step each: n is kept within
  the engine's token budget);
* decode: B sequences of context L decoding together, over a grid of B and L;
* mixed: a decode batch plus one prompt chunk in the same step (checks that costs add up);
* contention: the same decode batch in two engines at once against one alone (CPU hosts: the
  engines share cores);
* the router path: a Ray actor round trip (dispatch / emit / hand-off overheads);
* KV bandwidth: bytes through a shared-memory segment between two buffers (the same-host
  transport's data path), unless given.

`--quick` measures a coarse grid (about a minute on 2 cores). The step-cost model is fitted
from the samples when the profile is loaded; the command prints the fit's error.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from cluster.config import EngineConfig
from cluster.planner.profile import (
    Contention,
    Overheads,
    ParallelProfile,
    Profile,
    StepCostModel,
    StepSample,
    fit_summary,
)


@dataclass(frozen=True)
class ProfilePlan:
    prefill_lengths: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_steps: int
    repeats: int
    contention_steps: int

    @classmethod
    def quick(cls) -> ProfilePlan:
        return cls((32, 128, 384, 768), (1, 4, 16, 32), (128, 512), 4, 2, 16)

    @classmethod
    def full(cls) -> ProfilePlan:
        return cls((16, 32, 64, 128, 256, 384, 512, 768, 960), (1, 2, 4, 8, 16, 32, 48),
                   (64, 256, 512, 768), 8, 3, 40)


class ProfileWorker:
    """A Ray actor around one real engine; every method runs on the actor's thread."""

    def __init__(self, config: EngineConfig):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from cluster.engine import vllm_adapter as va

        self.va = va
        self.engine = va.build_engine(config)
        self.vocab = va.vocab_size(self.engine)
        self._ids = 0

    def describe(self) -> dict:
        va, engine = self.va, self.engine
        import torch
        import vllm

        sched = engine.vllm_config.scheduler_config
        blocks = va.num_usable_blocks(engine)
        cache = engine.vllm_config.cache_config
        model_config = engine.model_config
        return {
            "block_size": va.block_size(engine), "num_kv_blocks": blocks,
            "max_num_batched_tokens": int(sched.max_num_batched_tokens),
            "max_num_seqs": int(sched.max_num_seqs), "max_model_len": va.max_model_len(engine),
            "dtype": str(model_config.dtype), "vllm_version": vllm.__version__,
            "torch_version": torch.__version__, "kv_cache_dtype": str(cache.cache_dtype),
            "num_layers": model_config.get_num_layers(engine.vllm_config.parallel_config),
            "num_kv_heads": model_config.get_total_num_kv_heads(), "head_dim": model_config.get_head_size(),
            "hidden_size": model_config.get_hidden_size(), "vocab_size": self.vocab,
            "torch_threads": torch.get_num_threads(),
        }

    def ping(self) -> float:
        return time.perf_counter()

    def _prompt(self, n: int) -> list[int]:
        # Ids 3.. avoid the demo tokenizer's specials; any model's vocabulary has them.
        return [3 + (i * 7919 + self._ids) % (self.vocab - 3) for i in range(n)]

    def _add(self, n: int, max_tokens: int) -> str:
        from cluster.protocol import Sampling

        self._ids += 1
        rid = f"p{self._ids}"
        self.engine.add_request(rid, {"prompt_token_ids": self._prompt(n)},
                                self.va.to_sampling_params(Sampling(max_tokens=max_tokens, temperature=0.0,
                                                                    ignore_eos=True)))
        return rid

    def _timed_step(self) -> tuple[float, list]:
        start = time.perf_counter()
        outputs = self.engine.step()
        return time.perf_counter() - start, outputs

    def _drain(self) -> None:
        while self.va.has_work(self.engine):
            self.engine.step()

    def prefill(self, n: int, repeats: int) -> list[dict]:
        samples = []
        for _ in range(repeats):
            self._add(n, 1)
            seconds, _ = self._timed_step()
            self._drain()
            samples.append(asdict(StepSample(n, 1, 0, 0, seconds, n * n)))
        return samples

    def decode(self, batch: int, context: int, steps: int, prefill_chunk: int = 0) -> list[dict]:
        """`steps` decode steps of `batch` sequences that start at `context` tokens; with
        `prefill_chunk`, one new prompt of that many tokens joins the first timed step."""
        # Sequences that get their first token early decode while the others prefill: leave
        # them room to still be running through the timed steps.
        budget = self.engine.vllm_config.scheduler_config.max_num_batched_tokens
        max_tokens = min(steps + 4 + -(-batch * context // budget), self.va.max_model_len(self.engine) - context - 1)
        ids = [self._add(context, max_tokens) for _ in range(batch)]
        started: set[str] = set()
        while len(started) < batch:  # prefill (chunked) until every sequence has its first token
            _, outputs = self._timed_step()
            started.update(o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids)
        samples = []
        generated = 1
        for step in range(steps):
            chunk = prefill_chunk if step == 0 else 0
            if chunk:
                ids.append(self._add(chunk, 1))
            seconds, _ = self._timed_step()
            ctx = batch * (context + generated)
            samples.append(asdict(StepSample(chunk, 1 if chunk else 0, batch, ctx, seconds, chunk * chunk)))
            generated += 1
        self.engine.abort_request(ids)
        self._drain()
        return samples


def _shm_bandwidth(nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Bytes/s of the same-host transport's data path: source cache -> shared memory ->
    destination cache (two copies), median of `repeats`."""
    from multiprocessing import shared_memory

    import numpy as np

    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    seg = shared_memory.SharedMemory(create=True, size=nbytes)
    try:
        buf = np.ndarray((nbytes,), dtype=np.uint8, buffer=seg.buf)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            buf[:] = src
            dst[:] = buf
            times.append(time.perf_counter() - start)
        del buf
    finally:
        seg.close()
        seg.unlink()
    return nbytes / statistics.median(times[1:])


def hardware() -> dict:
    info = {"kind": "cpu", "machine": platform.machine(), "processor": platform.processor(),
            "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["kind"] = "gpu"
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def run_profile(config: EngineConfig, plan: ProfilePlan, tp: int = 1, num_cpus: float = 1.0,
                kv_bandwidth: float | None = None, progress: bool = True, name: str = "") -> Profile:
    """Starts Ray (local), two profile workers, measures, returns the Profile."""
    import ray
    from tqdm import tqdm

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, int(2 * num_cpus)), include_dashboard=False, log_to_driver=False)
    actor = ray.remote(num_cpus=num_cpus)(ProfileWorker)
    first = actor.remote(config)
    second = actor.remote(config)
    desc = ray.get(first.describe.remote())
    ray.get(second.describe.remote())
    budget, max_len = desc["max_num_batched_tokens"], desc["max_model_len"]
    lengths = [n for n in plan.prefill_lengths if n <= min(budget, max_len - 2)]
    grid = [(b, c) for c in plan.decode_contexts for b in plan.decode_batches
            if c + plan.decode_steps + 4 < max_len and b <= desc["max_num_seqs"]]
    mixed = [(b, c, chunk) for b, c in grid[::3] for chunk in lengths[1:3]]
    total = 2 + len(lengths) + len(grid) + len(mixed) + 3
    bar = tqdm(total=total, desc="profile", unit="task", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    samples: list[dict] = []
    try:
        bar.set_postfix_str("warm-up")
        ray.get(first.decode.remote(4, 64, 2))
        ray.get(first.prefill.remote(lengths[0], 1))
        bar.update(2)
        for n in lengths:
            bar.set_postfix_str(f"prefill {n} tokens")
            samples += ray.get(first.prefill.remote(n, plan.repeats))
            bar.update(1)
        for b, c in grid:
            bar.set_postfix_str(f"decode batch {b} context {c}")
            samples += ray.get(first.decode.remote(b, c, plan.decode_steps))
            bar.update(1)
        for b, c, chunk in mixed:
            bar.set_postfix_str(f"mixed: decode {b}x{c} + prompt {chunk}")
            samples += ray.get(first.decode.remote(b, c, 1, chunk))
            bar.update(1)
        bar.set_postfix_str("contention: one engine, then two at once")
        batch, context = 8, min(256, max_len // 4)
        alone = ray.get(first.decode.remote(batch, context, plan.contention_steps))
        bar.update(1)
        together = ray.get([first.decode.remote(batch, context, plan.contention_steps),
                            second.decode.remote(batch, context, plan.contention_steps)])
        bar.update(1)
        solo_s = statistics.median(s["seconds"] for s in alone)
        pair_s = statistics.median(s["seconds"] for run in together for s in run)
        bar.set_postfix_str("router path and KV bandwidth")
        rtts = []
        for _ in range(20):
            start = time.perf_counter()
            ray.get(first.ping.remote())
            rtts.append(time.perf_counter() - start)
        rtt = statistics.median(rtts)
        bandwidth = kv_bandwidth or _shm_bandwidth()
        bar.update(1)
    finally:
        bar.close()
        for a in (first, second):
            ray.kill(a)
    step_samples = tuple(StepSample(**s) for s in samples)
    cost = StepCostModel.fit(list(step_samples))
    kv_bytes_per_token = (2 * desc["num_layers"] * desc["num_kv_heads"] * desc["head_dim"]
                          * (2 if "16" in desc["kv_cache_dtype"] or "16" in desc["dtype"] else 4))
    return Profile(
        hardware=hardware() | {"ray_num_cpus_per_instance": num_cpus, "torch_threads": desc["torch_threads"]},
        model={"name": os.path.basename(config.model.rstrip("/")), "path": config.model, "dtype": desc["dtype"],
               "layers": desc["num_layers"], "hidden": desc["hidden_size"], "kv_heads": desc["num_kv_heads"],
               "head_dim": desc["head_dim"], "vocab_size": desc["vocab_size"]},
        vllm_version=desc["vllm_version"],
        block_size=desc["block_size"], max_num_batched_tokens=budget, max_num_seqs=desc["max_num_seqs"],
        max_model_len=max_len, kv_bytes_per_token=float(kv_bytes_per_token),
        kv_bandwidth_bytes_per_s=bandwidth, kv_latency_s=rtt,
        parallel={tp: ParallelProfile(tp, desc["num_kv_blocks"], cost, step_samples)},
        contention=Contention(pair_slowdown=max(1.0, pair_s / solo_s)),
        # One Ray call each way plus the gRPC hop the client sees (about as much again).
        overheads=Overheads(dispatch_s=2 * rtt, emit_s=2 * rtt, handoff_s=4 * rtt, startup_s=20.0),
        name=name or f"{os.path.basename(config.model.rstrip('/'))}@{platform.node()}",
        notes=(f"measured by disagg-serve profile ({'quick' if plan == ProfilePlan.quick() else 'full'}); "
               f"contention: decode batch {batch} x {context} tokens, {solo_s * 1e3:.2f} ms alone, "
               f"{pair_s * 1e3:.2f} ms with a second engine busy; overheads from a Ray actor round trip of "
               f"{rtt * 1e3:.2f} ms"),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def describe_profile(profile: Profile) -> str:
    where = profile.hardware.get("cpu_model") or profile.hardware.get("gpu")
    lines = [f"profile {profile.name}: {profile.model.get('name')} on {where} (vLLM {profile.vllm_version})"]
    for tp, par in sorted(profile.parallel.items()):
        c = par.cost
        lines.append(f"  TP {tp}: {par.num_kv_blocks} KV blocks of {profile.block_size} tokens; step = "
                     f"{c.const_s * 1e3:.2f} ms + {c.per_prefill_token_s * 1e6:.2f} us/prompt token + "
                     f"{c.per_prefill_attention_s * 1e9:.3f} ns/attention pair + "
                     f"{c.per_decode_seq_s * 1e6:.1f} us/decode seq + "
                     f"{c.per_context_token_s * 1e9:.1f} ns/context token")
        lines.append(f"        prefill 128/512 tokens: {c.prefill_seconds(128) * 1e3:.1f}/"
                     f"{c.prefill_seconds(512) * 1e3:.1f} ms; "
                     f"decode batch 1/16 at 256 context: {c.decode_seconds(1, 256) * 1e3:.1f}/"
                     f"{c.decode_seconds(16, 256) * 1e3:.1f} ms")
    for tp, fit in fit_summary(profile).items():
        lines.append(f"  fit TP {tp}: {fit['samples']} samples, median error {fit['median_rel_error'] * 100:.1f}%, "
                     f"worst {fit['max_rel_error'] * 100:.1f}%")
    lines.append(f"  KV: {profile.kv_bytes_per_token:.0f} B/token, {profile.kv_bandwidth_bytes_per_s / 1e9:.2f} GB/s; "
                 f"two engines on one host: x{profile.contention.pair_slowdown:.2f} per step")
    return "\n".join(lines)
