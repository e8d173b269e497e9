"""The profile file: what one engine instance costs on some hardware, for the simulator, the
planner and the autoscaler.

A profile holds measured (or synthesized) engine *steps*: for each tensor-parallel degree, a
list of samples "a step that computed P prompt tokens of S sequences and decoded D sequences
holding C context tokens took T seconds". From them it fits one linear step-cost model

    T = const + a * P + b * A + c * S + d * D + e * C

where A = sum over the prefilling sequences of chunk x context at the chunk's end (attention
over the prompt grows quadratically). The fit is a non-negative least squares on *relative*
error (rows weighted by 1/T), so small decode steps count as much as long prefills. A profile
may also give the coefficients directly (synthesized profiles have no samples).

Besides step costs: the KV cache (blocks per instance, bytes per token), the KV transfer
bandwidth between instances, how much engines on one host slow each other down (contention),
the fixed overheads of the router path, and what hardware, model and vLLM it was taken with.
Pure data and numpy/scipy: no engine, no Ray.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

PROFILE_VERSION = 1


@dataclass(frozen=True)
class StepSample:
    """One measured engine step."""

    prefill_tokens: int
    prefill_seqs: int
    decode_seqs: int
    decode_context: int
    seconds: float
    # sum over prefilling sequences of chunk * (tokens computed at the chunk's end)
    prefill_attention: int = 0


@dataclass(frozen=True)
class StepCostModel:
    """Seconds of one engine step from what it computes (see the module docstring)."""

    const_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_prefill_attention_s: float = 0.0
    per_prefill_seq_s: float = 0.0
    per_decode_seq_s: float = 0.0
    per_context_token_s: float = 0.0

    def step_seconds(self, prefill_tokens: int = 0, prefill_seqs: int = 0, decode_seqs: int = 0,
                     decode_context: int = 0, prefill_attention: int = 0) -> float:
        return (self.const_s + self.per_prefill_token_s * prefill_tokens
                + self.per_prefill_attention_s * prefill_attention
                + self.per_prefill_seq_s * prefill_seqs + self.per_decode_seq_s * decode_seqs
                + self.per_context_token_s * decode_context)

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """One prompt alone, in one step."""
        return self.step_seconds(prompt_tokens, 1, 0, 0, prompt_tokens * prompt_tokens)

    def decode_seconds(self, batch: int, context_per_seq: float) -> float:
        """One decode step of `batch` sequences of `context_per_seq` tokens each."""
        return self.step_seconds(0, 0, batch, int(batch * context_per_seq))

    @staticmethod
    def features(s: StepSample) -> list[float]:
        return [1.0, s.prefill_tokens, s.prefill_attention, s.prefill_seqs, s.decode_seqs, s.decode_context]

    @classmethod
    def fit(cls, samples: list[StepSample]) -> StepCostModel:
        """Non-negative least squares on relative error (each row divided by its seconds)."""
        from scipy.optimize import nnls  # scipy only where a profile is fitted

        if not samples:
            raise ValueError("no step samples to fit")
        x = np.array([cls.features(s) for s in samples], dtype=float)
        y = np.array([s.seconds for s in samples], dtype=float)
        if np.any(y <= 0):
            raise ValueError("step samples must have seconds > 0")
        # Column scaling keeps the solver well conditioned (tokens are ~1e3, attention ~1e6).
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        coef, _ = nnls(x / scale / y[:, None], np.ones_like(y))
        coef = coef / scale
        return cls(*[float(c) for c in coef])

    def relative_errors(self, samples: list[StepSample]) -> list[float]:
        """(predicted - measured) / measured for each sample."""
        return [(self.step_seconds(s.prefill_tokens, s.prefill_seqs, s.decode_seqs, s.decode_context,
                                   s.prefill_attention) - s.seconds) / s.seconds for s in samples]


@dataclass(frozen=True)
class ParallelProfile:
    """Costs of one instance at one tensor-parallel degree (it takes `tp` GPUs)."""

    tp: int
    num_kv_blocks: int
    cost: StepCostModel
    samples: tuple[StepSample, ...] = ()

    @property
    def gpus(self) -> int:
        return self.tp


@dataclass(frozen=True)
class Contention:
    """How engines that share a host's cores slow each other down (CPU hosts; a GPU instance
    owns its devices and has none).

    The host has `cores` engine-equivalents of compute: k engines computing a step at the same
    moment each progress at min(1, available / k) of their solo speed, where available is
    `cores` less what the serving path (router, clients: `router_cpu_per_token_s` CPU-seconds
    per streamed token, at the host's current token rate) takes. `cores` comes from the
    measured two-engine factor: two engines alone run 1/pair_slowdown as fast, so the host has
    2 / pair_slowdown engine-equivalents. Without `cores` (older profiles): slowdown(k) =
    1 + (pair_slowdown - 1)(k - 1)."""

    pair_slowdown: float = 1.0
    # Engines per host (None: all instances of the simulated cluster share one host).
    engines_per_host: int | None = None
    cores: float | None = None
    router_cpu_per_token_s: float = 0.0

    @property
    def shared(self) -> bool:
        return self.pair_slowdown != 1.0 or self.cores is not None

    def slowdown(self, busy: int, router_load: float = 0.0) -> float:
        """Solo time / shared time of each of `busy` engines; `router_load` in engine-equivalents."""
        if self.cores is None:
            return 1.0 + (self.pair_slowdown - 1.0) * max(0, busy - 1)
        available = max(0.05, self.cores - router_load)
        return max(1.0, busy / available) if busy else 1.0


@dataclass(frozen=True)
class Overheads:
    """Fixed latencies of the serving path outside engine steps (router, Ray calls, gRPC)."""

    # Client send -> the request is in the engine's queue.
    dispatch_s: float = 0.002
    # Engine step end -> the client has the tokens.
    emit_s: float = 0.002
    # Prefill's first token at the router -> the decode instance has the request (beyond KV bytes).
    handoff_s: float = 0.003
    # Seconds to start an instance (autoscaler scale-out in the simulator).
    startup_s: float = 20.0
    # Serving-path work that lengthens each engine step beyond engine.step() itself (the
    # worker's loop and poll thread, the router and clients sharing the host's cores): per
    # step, and per token the step streams. 0 on a dedicated host; on a small shared CPU host
    # they dominate (measure them with `bench-suite sim-validation`'s calibration).
    step_s: float = 0.0
    per_token_s: float = 0.0


@dataclass(frozen=True)
class Profile:
    hardware: dict
    model: dict
    vllm_version: str
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    kv_bytes_per_token: float
    kv_bandwidth_bytes_per_s: float
    parallel: dict[int, ParallelProfile]
    kv_latency_s: float = 0.001
    contention: Contention = field(default_factory=Contention)
    overheads: Overheads = field(default_factory=Overheads)
    # What one GPU of this kind costs per hour (Mélange); None: count GPUs instead.
    price_per_gpu_hour: float | None = None
    name: str = ""
    notes: str = ""
    # Speculative decoding step costs, when measured: {"k": .., "samples": [...], ...}.
    spec: dict | None = None
    created: str = ""

    def at(self, tp: int) -> ParallelProfile:
        if tp not in self.parallel:
            raise KeyError(f"profile {self.name or '(unnamed)'} has no tensor-parallel degree {tp} "
                           f"(has {sorted(self.parallel)})")
        return self.parallel[tp]

    @property
    def tp_degrees(self) -> list[int]:
        return sorted(self.parallel)

    def kv_transfer_seconds(self, tokens: int) -> float:
        return self.kv_latency_s + tokens * self.kv_bytes_per_token / self.kv_bandwidth_bytes_per_s

    def with_changes(self, **changes) -> Profile:
        return replace(self, **changes)

    # ---- JSON ----
    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = PROFILE_VERSION
        d["parallel"] = {str(tp): {"tp": p.tp, "num_kv_blocks": p.num_kv_blocks, "cost": asdict(p.cost),
                                   "samples": [asdict(s) for s in p.samples]}
                         for tp, p in sorted(self.parallel.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        d = dict(d)
        version = d.pop("version", PROFILE_VERSION)
        if version != PROFILE_VERSION:
            raise ValueError(f"profile version {version} is not {PROFILE_VERSION}")
        parallel = {}
        for key, p in d.pop("parallel").items():
            samples = tuple(StepSample(**s) for s in p.get("samples", ()))
            cost = StepCostModel(**p["cost"]) if p.get("cost") else StepCostModel.fit(list(samples))
            parallel[int(key)] = ParallelProfile(int(p.get("tp", key)), int(p["num_kv_blocks"]), cost, samples)
        d["contention"] = Contention(**d.get("contention", {}))
        d["overheads"] = Overheads(**d.get("overheads", {}))
        return cls(parallel=parallel, **d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read profile {path}: {exc}") from exc


def refit(profile: Profile) -> Profile:
    """The same profile with every degree's cost model fitted again from its samples."""
    parallel = {tp: replace(p, cost=StepCostModel.fit(list(p.samples))) if p.samples else p
                for tp, p in profile.parallel.items()}
    return replace(profile, parallel=parallel)


def fit_summary(profile: Profile) -> dict[int, dict]:
    """Per degree: samples and the fit's median / worst relative error (profiles with samples)."""
    out = {}
    for tp, p in sorted(profile.parallel.items()):
        if not p.samples:
            continue
        errs = np.abs(p.cost.relative_errors(list(p.samples)))
        out[tp] = {"samples": len(p.samples), "median_rel_error": float(np.median(errs)),
                   "max_rel_error": float(errs.max())}
    return out


def blocks_for(tokens: float, block_size: int) -> int:
    return max(0, math.ceil(tokens / block_size))
