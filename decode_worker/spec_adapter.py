"""TETRIS inside vLLM's draft-model speculative decoding: the one adapter, pinned to vLLM 0.32.0.

How it hooks in (in-process engine core, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, V1 model
runner, no async scheduling).  One engine step of vLLM 0.32.0 runs, in ``EngineCore``:

1. ``step``: ``Scheduler.schedule`` -> ``GPUModelRunner.execute_model`` / ``sample_tokens``,
   which verifies the drafts scheduled this step and then calls
   ``propose_draft_token_ids``: the drafter (``SpecDecodeBaseProposer.propose``) proposes
   ``K = num_speculative_tokens`` tokens per request; with
   ``draft_sample_method="probabilistic"`` and a batch that is not all-greedy it keeps the
   full-vocabulary draft distributions, which the runner stores as ``_draft_probs``
   ``[num_reqs, K, V]`` with their row ids ``_draft_prob_req_ids``;
   then ``Scheduler.update_from_output`` books the step (accepted tokens).
2. ``post_step``: ``model_executor.take_draft_token_ids()`` ->
   ``GPUModelRunner.take_draft_token_ids`` returns ``DraftTokenIds(req_ids, lists)``, which
   ``Scheduler.update_draft_token_ids`` stores as each request's ``spec_token_ids``; the
   next ``schedule`` sends them to verification.

The adapter patches four *instance* attributes (never a class):

* ``model_runner.take_draft_token_ids`` (the TETRIS hook): computes each draft token's
  log-probability, runs ``tetris.plan`` over the batch's live decode requests and trims
  each request's list to its prefix length before the scheduler sees it.  Trimming to a
  prefix is lossless: at verification ``GPUModelRunner._get_spec_decode_draft_probs``
  slices ``_draft_probs[row, :num_draft]`` by request id, so the kept probabilities stay
  aligned with the kept tokens; greedy requests verify by exact match.
* ``drafter._greedy_sample`` (confidence for all-greedy batches, where vLLM keeps no
  probabilities): the same argmax as vLLM's own default branch, computed from the same
  logits, plus the log-softmax of the chosen token, recorded per draft position.  The
  other branches (local argmax reduction, heterogeneous vocabularies) call vLLM's original
  and leave no confidence (TETRIS then falls back to window ``k`` for that step).
* ``drafter.propose``: resets that record at the start of every proposal.
* ``scheduler.update_from_output``: counts what was really verified and accepted
  (vLLM's own rule: accepted = sampled tokens - ``num_sampled_tokens_per_step``), and reads
  vLLM's ``SpecDecodingStats`` too when the engine logs stats.

``check_vllm_internals()`` asserts every attribute, signature and source fact used here and
names what moved.  See ``tests/unit/decode_worker/test_spec_adapter.py``.

``fix_cpu_expand_kernel()`` (``cluster/engine/vllm_cpu_fix.py``, called by ``install_tetris``
and by every engine that speculates) works around a vLLM 0.32.0 CPU bug that makes sampled
(temperature > 0) verification read uninitialised temperatures.

Not covered (``install_tetris`` refuses them with a clear error): the multiprocess engine
core, async scheduling (the GPU default with ``draft_model``: the worker then feeds its own
draft tensor to the next step and ``take_draft_token_ids`` is never consulted by the
scheduler), the engine-core batch queue, and the V2 model runner (``v1/worker/gpu/``, which
vLLM picks on GPUs with Triton unless ``VLLM_USE_V2_MODEL_RUNNER=0``).
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from cluster.engine.vllm_cpu_fix import cpu_fix_problems, fix_cpu_expand_kernel
from cluster.engine.vllm_pin import PINNED_VLLM_VERSION, VllmInternalsError, check_vllm_version
from decode_worker.tetris import TetrisConfig, plan

__all__ = [
    "PINNED_VLLM_VERSION",
    "StepRecord",
    "TetrisStats",
    "VllmInternalsError",
    "check_vllm_internals",
    "check_vllm_version",
    "fix_cpu_expand_kernel",
    "install_tetris",
    "model_runner_of",
    "set_tetris_config",
    "uninstall_tetris",
]

# sha256 of inspect.getsource(SpecDecodeBaseProposer._greedy_sample) in vLLM 0.32.0: the
# adapter re-implements its default branch, so any edit to it must be reviewed.
_GREEDY_SAMPLE_SHA256 = "e539abab1b225d277b31b48d90b95e45a7c38f3750080eb12d75ace9bcb174d8"

_STATE_ATTR = "_disagg_tetris_state"
# (owner, vLLM attribute) -> the _TetrisState method that replaces it on the instance.
_PATCHED = {
    ("runner", "take_draft_token_ids"): "take_draft_token_ids",
    ("drafter", "_greedy_sample"): "greedy_sample",
    ("drafter", "propose"): "propose",
    ("scheduler", "update_from_output"): "update_from_output",
}


# --------------------------------------------------------------------------- pins


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def check_vllm_internals() -> None:
    """Assert every vLLM attribute/method/source fact the adapter relies on; raise one
    ``VllmInternalsError`` listing everything that moved."""
    problems: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    def src(obj) -> str:
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError) as e:  # pragma: no cover - only when vLLM moved
            problems.append(f"cannot read source of {obj!r}: {e}")
            return ""

    try:
        check_vllm_version()
    except VllmInternalsError as e:
        problems.append(str(e))

    try:
        from vllm.v1.core.sched.output import SchedulerOutput
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.engine.core_client import InprocClient
        from vllm.v1.executor.uniproc_executor import UniProcExecutor
        from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
        from vllm.v1.request import Request
        from vllm.v1.spec_decode.draft_model import DraftModelProposer
        from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
        from vllm.v1.spec_decode.metrics import SpecDecodingStats
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.gpu_worker import Worker
        from vllm.v1.worker.worker_base import WorkerWrapperBase
    except ImportError as e:
        raise VllmInternalsError(f"vLLM module moved: {e}") from e

    # Reaching the model runner from an LLMEngine (in-process core).
    need("self.engine_core = EngineCore(" in src(InprocClient.__init__),
         "InprocClient.engine_core (the in-process EngineCore)")
    need("self.driver_worker = WorkerWrapperBase(" in src(UniProcExecutor._init_executor),
         "UniProcExecutor.driver_worker")
    need("self.worker = worker_class(" in src(WorkerWrapperBase.init_worker),
         "WorkerWrapperBase.worker")
    need("self.model_runner.take_draft_token_ids()" in src(Worker.take_draft_token_ids),
         "Worker.take_draft_token_ids delegating to model_runner.take_draft_token_ids()")

    # EngineCore: post_step hands drafts to the scheduler unless async scheduling is on.
    post_step = src(EngineCore.post_step)
    need("self.model_executor.take_draft_token_ids()" in post_step
         and "self.scheduler.update_draft_token_ids(" in post_step
         and "not self.async_scheduling" in post_step,
         "EngineCore.post_step: take_draft_token_ids -> scheduler.update_draft_token_ids "
         "(skipped under async scheduling)")
    core_init = src(EngineCore.__init__)
    need("self.async_scheduling" in core_init and "self.batch_queue" in core_init,
         "EngineCore.async_scheduling / EngineCore.batch_queue")
    need("self.scheduler.update_from_output(" in src(EngineCore.step),
         "EngineCore.step calling self.scheduler.update_from_output(...)")

    # Model runner: draft lists, draft probabilities and their alignment at verification.
    need(_params(GPUModelRunner.take_draft_token_ids) == ["self"],
         "GPUModelRunner.take_draft_token_ids(self)")
    need("DraftTokenIds(req_ids, draft_token_ids)" in src(GPUModelRunner.take_draft_token_ids),
         "GPUModelRunner.take_draft_token_ids returning DraftTokenIds(req_ids, draft_token_ids)")
    runner_init = src(GPUModelRunner.__init__)
    for attr in ("self._draft_probs", "self._draft_prob_req_ids", "self.drafter",
                 "self.num_spec_tokens", "self.speculative_config"):
        need(attr in runner_init, f"GPUModelRunner.__init__ sets {attr}")
    propose_src = src(GPUModelRunner.propose_draft_token_ids)
    need("self.drafter.take_last_draft_probs()" in propose_src
         and "self._draft_prob_req_ids = self.input_batch.req_ids.copy()" in propose_src,
         "GPUModelRunner.propose_draft_token_ids storing _draft_probs/_draft_prob_req_ids")
    need(_params(GPUModelRunner._get_spec_decode_draft_probs) == ["self", "spec_decode_metadata"],
         "GPUModelRunner._get_spec_decode_draft_probs(self, spec_decode_metadata)")
    probs_src = src(GPUModelRunner._get_spec_decode_draft_probs)
    need("self._draft_probs[row_idx, :num_draft]" in probs_src
         and "self._draft_prob_req_ids" in probs_src,
         "GPUModelRunner._get_spec_decode_draft_probs slicing _draft_probs[row, :num_draft] "
         "by request id (what keeps trimmed prefixes aligned)")
    need({"req_ids", "draft_token_ids"} <= set(getattr(DraftTokenIds, "__dataclass_fields__", {})),
         "vllm.v1.outputs.DraftTokenIds(req_ids, draft_token_ids)")

    # Drafter: where draft tokens are picked.
    need(issubclass(DraftModelProposer, SpecDecodeBaseProposer),
         "DraftModelProposer subclassing SpecDecodeBaseProposer")
    need(DraftModelProposer._greedy_sample is SpecDecodeBaseProposer._greedy_sample,
         "DraftModelProposer not overriding _greedy_sample")
    need(_params(SpecDecodeBaseProposer._greedy_sample) == ["self", "hidden_states"],
         "SpecDecodeBaseProposer._greedy_sample(self, hidden_states)")
    greedy_src = src(SpecDecodeBaseProposer._greedy_sample)
    need(hashlib.sha256(greedy_src.encode()).hexdigest() == _GREEDY_SAMPLE_SHA256,
         "SpecDecodeBaseProposer._greedy_sample source changed (the adapter re-implements its "
         "default branch: review _GreedyConfidence and update _GREEDY_SAMPLE_SHA256)")
    need("self._greedy_sample(hidden_states)" in src(SpecDecodeBaseProposer._sample_draft_tokens),
         "SpecDecodeBaseProposer._sample_draft_tokens calling self._greedy_sample(hidden_states)")
    propose_params = _params(SpecDecodeBaseProposer.propose)
    need(propose_params[:2] == ["self", "num_speculative_tokens"],
         "SpecDecodeBaseProposer.propose(self, num_speculative_tokens, ...)")
    base_init = src(SpecDecodeBaseProposer.__init__)
    need("self.use_local_argmax_reduction" in base_init,
         "SpecDecodeBaseProposer.use_local_argmax_reduction")

    # Scheduler: booking of a step, request fields used for eligibility / useful lengths.
    need(_params(Scheduler.update_from_output) == ["self", "scheduler_output", "model_runner_output"],
         "Scheduler.update_from_output(self, scheduler_output, model_runner_output)")
    upd = src(Scheduler.update_from_output)
    need("max(len(generated_token_ids) - num_sampled, 0)" in upd,
         "Scheduler.update_from_output's accepted-token rule "
         "(len(generated) - num_sampled_tokens_per_step)")
    sched_init = src(Scheduler.__init__)
    for attr in ("self.requests", "self.num_sampled_tokens_per_step", "self.max_model_len"):
        need(attr in sched_init, f"Scheduler.__init__ sets {attr}")
    need("if request.is_prefill_chunk:" in src(Scheduler.update_draft_token_ids),
         "Scheduler.update_draft_token_ids ignoring drafts of prefill chunks")
    need("scheduled_spec_decode_tokens" in getattr(SchedulerOutput, "__dataclass_fields__", {}),
         "SchedulerOutput.scheduled_spec_decode_tokens")
    mro_fields = getattr(ModelRunnerOutput, "__dataclass_fields__", {})
    need({"sampled_token_ids", "req_id_to_index"} <= set(mro_fields),
         "ModelRunnerOutput.sampled_token_ids / req_id_to_index")
    req_init = src(Request.__init__)
    for attr in ("self.is_prefill_chunk", "self.max_tokens"):
        need(attr in req_init, f"Request.__init__ sets {attr}")
    for name in ("num_tokens", "num_output_tokens", "is_finished"):
        need(hasattr(Request, name), f"Request.{name}")
    need({"num_draft_tokens", "num_accepted_tokens", "num_drafts"}
         <= set(getattr(SpecDecodingStats, "__dataclass_fields__", {})),
         "SpecDecodingStats.num_drafts / num_draft_tokens / num_accepted_tokens")

    problems.extend(cpu_fix_problems())

    if problems:
        raise VllmInternalsError(
            "vLLM internals used by decode_worker/spec_adapter.py moved:\n  - "
            + "\n  - ".join(problems))


# --------------------------------------------------------------------------- stats


@dataclass
class StepRecord:
    """One TETRIS decision (made after step t) and its verification (in step t+1)."""

    num_requests: int  # live decode requests planned over
    capacity: int  # budget used (window-k fallback: k per request)
    proposed: int  # draft tokens proposed for them (K each)
    planned: int  # draft tokens left after trimming (sent to the scheduler)
    source: str  # "probs" | "greedy" | "window" (no confidence / fallback / disabled)
    lengths: list[int] = field(default_factory=list)
    verified: int | None = None  # filled when the next step books: drafts really verified
    accepted: int | None = None
    verified_requests: int | None = None


@dataclass
class TetrisStats:
    """Counters of one engine with TETRIS installed (totals over its life)."""

    num_speculative_tokens: int
    steps: int = 0  # TETRIS decisions with at least one live decode request
    request_steps: int = 0  # sum over decisions of live decode requests
    proposed: int = 0  # draft tokens proposed for those requests (K each)
    planned: int = 0  # draft tokens kept by TETRIS
    verified: int = 0  # draft tokens the scheduler really sent to verification
    accepted: int = 0  # of those, accepted by the target
    verified_request_steps: int = 0  # request-steps booked after a TETRIS decision
    window_fallbacks: int = 0  # decisions that used plain window k
    # From vLLM's own SpecDecodingStats (only when the engine logs stats).
    vllm_draft_tokens: int = 0
    vllm_accepted_tokens: int = 0
    vllm_stats_seen: bool = False
    history: deque = field(default_factory=lambda: deque(maxlen=4096))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified draft tokens."""
        return self.accepted / self.verified if self.verified else 0.0

    @property
    def mean_accepted_per_request_step(self) -> float:
        """Accepted draft tokens per decode request-step (each also yields one more token)."""
        return self.accepted / self.verified_request_steps if self.verified_request_steps else 0.0

    @property
    def trim_ratio(self) -> float:
        return self.planned / self.proposed if self.proposed else 0.0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "num_speculative_tokens": self.num_speculative_tokens,
                "steps": self.steps,
                "request_steps": self.request_steps,
                "proposed": self.proposed,
                "planned": self.planned,
                "verified": self.verified,
                "accepted": self.accepted,
                "verified_request_steps": self.verified_request_steps,
                "window_fallbacks": self.window_fallbacks,
                "acceptance_rate": self.acceptance_rate,
                "mean_accepted_per_request_step": self.mean_accepted_per_request_step,
                "vllm_draft_tokens": self.vllm_draft_tokens if self.vllm_stats_seen else None,
                "vllm_accepted_tokens": self.vllm_accepted_tokens if self.vllm_stats_seen else None,
            }


# --------------------------------------------------------------------------- engine access


def _engine_core(engine):
    client = getattr(engine, "engine_core", None)
    core = getattr(client, "engine_core", None)
    if core is None:
        raise VllmInternalsError(
            "TETRIS needs the in-process engine core: set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
            f"before building the engine (engine.engine_core is {type(client).__name__})")
    return core


def model_runner_of(engine):
    """``engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner``."""
    core = _engine_core(engine)
    obj = core
    for name in ("model_executor", "driver_worker", "worker", "model_runner"):
        if not hasattr(obj, name):
            raise VllmInternalsError(
                f"cannot reach the model runner: {type(obj).__name__} has no {name!r} "
                "(a multi-worker executor? TETRIS supports the uniprocess executor)")
        obj = getattr(obj, name)
    return obj


# --------------------------------------------------------------------------- the hook


class _TetrisState:
    def __init__(self, config: TetrisConfig, stats: TetrisStats, core, runner, drafter,
                 scheduler):
        self.config = config
        self.stats = stats
        self.core, self.runner, self.drafter, self.scheduler = core, runner, drafter, scheduler
        self.greedy_log_probs: list | None = None  # per position [B] tensors, or None entries
        self.pending: tuple[StepRecord, dict[str, int]] | None = None  # last decision
        self.originals: dict[tuple[str, str], Any] = {}
        self.shadowed: dict[tuple[str, str], bool] = {}

    # ----- confidence

    def greedy_sample(self, hidden_states):
        drafter = self.drafter
        if drafter.use_local_argmax_reduction or getattr(drafter, "use_heterogeneous_vocab", False):
            ids = self.originals[("drafter", "_greedy_sample")](hidden_states)
            if self.greedy_log_probs is not None:
                self.greedy_log_probs.append(None)
            return ids
        # vLLM 0.32.0's default branch: compute_logits(hidden_states).argmax(dim=-1).
        logits = drafter.model.compute_logits(hidden_states)
        ids = logits.argmax(dim=-1)
        if self.greedy_log_probs is not None:
            lf = logits.float()
            lp = lf.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lf, dim=-1)
            self.greedy_log_probs.append(lp)
        return ids

    def propose(self, *args, **kwargs):
        self.greedy_log_probs = []
        return self.originals[("drafter", "propose")](*args, **kwargs)

    def _draft_log_probs(self, req_ids: list[str], drafts: list[list[int]], live: list[int]):
        """``[len(live), K]`` float64 log-probs of the proposed tokens of the rows ``live``
        of the batch ``req_ids`` (the runner's row order), and their source; or None."""
        width = max((len(drafts[i]) for i in live), default=0)
        probs, prob_ids = self.runner._draft_probs, self.runner._draft_prob_req_ids
        if probs is not None and prob_ids is not None:
            row_of = {r: i for i, r in enumerate(prob_ids)}
            if all(req_ids[i] in row_of for i in live) and probs.shape[1] >= width:
                dev = probs.device
                rows = torch.tensor([row_of[req_ids[i]] for i in live], dtype=torch.long,
                                    device=dev)
                pos = torch.arange(width, dtype=torch.long, device=dev)
                tok = torch.tensor([drafts[i] + [0] * (width - len(drafts[i])) for i in live],
                                   dtype=torch.long, device=dev)
                # [n, width]: the draft probability of each proposed token (no [n, K, V] copy).
                picked = probs[rows[:, None], pos[None, :], tok]
                return torch.log(picked.double()).cpu().numpy(), "probs"
        # All-greedy batch: the confidences captured by greedy_sample, one [B] tensor per
        # draft position, rows in the order the drafter saw the batch (= req_ids).
        cap = self.greedy_log_probs
        if cap and len(cap) >= width and all(t is not None for t in cap[:width]) \
                and all(t.shape[0] == len(req_ids) for t in cap[:width]):
            lp = torch.stack(cap[:width], dim=1).double().cpu().numpy()
            return lp[live], "greedy"
        return None, "window"

    def _useful_length(self, req_id: str, proposed: int) -> int:
        """Drafts that can matter: 0 for finished/prefill-chunk requests; otherwise capped
        by the request's remaining max_tokens and the model length (always safe: fewer
        drafts never change the output)."""
        req = self.scheduler.requests.get(req_id)
        if req is None or req.is_finished() or req.is_prefill_chunk:
            return -1
        left = proposed
        if req.max_tokens is not None:
            left = min(left, req.max_tokens - req.num_output_tokens - 1)
        left = min(left, self.scheduler.max_model_len - req.num_tokens - 1)
        return max(left, 0)

    def take_draft_token_ids(self):
        out = self.originals[("runner", "take_draft_token_ids")]()
        try:
            return out if out is None else self._trim(out)
        finally:
            self.greedy_log_probs = None  # this step's confidences are used up

    def _trim(self, out):
        from vllm.v1.outputs import DraftTokenIds

        config = self.config
        req_ids = list(out.req_ids)
        drafts = [list(d) for d in out.draft_token_ids]
        if not req_ids:
            return out
        useful = [self._useful_length(r, len(d)) for r, d in zip(req_ids, drafts, strict=True)]
        live = [i for i, u in enumerate(useful) if u >= 0]
        lengths = [0] * len(req_ids)
        source = "window"
        n = len(live)
        capacity = config.k * n
        if n:
            valid = np.array([useful[i] for i in live], dtype=np.int64)
            log_probs, source = (self._draft_log_probs(req_ids, drafts, live)
                                 if config.enabled and n >= config.min_batch_size
                                 else (None, "window"))
            if log_probs is None:
                chosen = np.minimum(valid, config.k)
                source = "window"
            else:
                chosen = plan(log_probs, config, valid_lengths=valid)
                capacity = config.capacity_for(n)
            for i, length in zip(live, chosen.tolist(), strict=True):
                lengths[i] = int(length)
        trimmed = [d[:length] for d, length in zip(drafts, lengths, strict=True)]
        record = StepRecord(
            num_requests=n, capacity=capacity,
            proposed=sum(len(drafts[i]) for i in live), planned=sum(lengths),
            source=source, lengths=[lengths[i] for i in live])
        with self.stats._lock:
            if n:
                self.stats.steps += 1
                self.stats.request_steps += n
                self.stats.proposed += record.proposed
                self.stats.planned += record.planned
                self.stats.window_fallbacks += source == "window"
                self.stats.history.append(record)
        self.pending = (record, {req_ids[i]: lengths[i] for i in live}) if n else None
        return DraftTokenIds(req_ids, trimmed)

    # ----- booking

    def update_from_output(self, scheduler_output, model_runner_output):
        pending, self.pending = self.pending, None
        if pending is not None:
            record, planned = pending
            verified = accepted = reqs = 0
            num_sampled = getattr(self.scheduler, "num_sampled_tokens_per_step", 1)
            spec = scheduler_output.scheduled_spec_decode_tokens
            sampled = model_runner_output.sampled_token_ids
            index = model_runner_output.req_id_to_index
            for req_id in scheduler_output.num_scheduled_tokens:
                if req_id not in planned:
                    continue
                reqs += 1
                drafts = spec.get(req_id) or []
                if not drafts:
                    continue
                verified += len(drafts)
                i = index.get(req_id)
                generated = sampled[i] if sampled and i is not None else []
                if generated:
                    accepted += max(len(generated) - num_sampled, 0)
            record.verified, record.accepted, record.verified_requests = verified, accepted, reqs
            with self.stats._lock:
                self.stats.verified += verified
                self.stats.accepted += accepted
                self.stats.verified_request_steps += reqs
        outputs = self.originals[("scheduler", "update_from_output")](
            scheduler_output, model_runner_output)
        for eco in (outputs or {}).values():
            sched_stats = getattr(eco, "scheduler_stats", None)
            sds = getattr(sched_stats, "spec_decoding_stats", None)
            if sds is not None:
                with self.stats._lock:
                    self.stats.vllm_stats_seen = True
                    self.stats.vllm_draft_tokens += sds.num_draft_tokens
                    self.stats.vllm_accepted_tokens += sds.num_accepted_tokens
        return outputs


def install_tetris(engine, config: TetrisConfig) -> TetrisStats:
    """Apply TETRIS to ``engine`` (a ``vllm.v1.engine.llm_engine.LLMEngine`` built with the
    in-process core and ``speculative_config(draft, config)``); returns its live stats.

    Patches instance attributes only (see the module docstring); ``uninstall_tetris``
    restores them; ``set_tetris_config`` swaps the config between steps.
    """
    check_vllm_internals()
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    core = _engine_core(engine)
    if getattr(core, _STATE_ATTR, None) is not None:
        raise RuntimeError("TETRIS is already installed on this engine")
    if core.async_scheduling:
        raise VllmInternalsError(
            "TETRIS needs async scheduling off (engine arg async_scheduling=False): with it "
            "on, vLLM 0.32.0 never hands draft lists to the scheduler (EngineCore.post_step)")
    if core.batch_queue is not None:
        raise VllmInternalsError(
            "TETRIS needs the engine core without a batch queue (pipeline parallelism / "
            "max_concurrent_batches > 1 pad trimmed drafts back with -1)")
    runner = model_runner_of(engine)
    if not isinstance(runner, GPUModelRunner):
        raise VllmInternalsError(
            f"TETRIS hooks the V1 model runner (GPUModelRunner), found {type(runner).__module__}."
            f"{type(runner).__name__}; set VLLM_USE_V2_MODEL_RUNNER=0")
    drafter = getattr(runner, "drafter", None)
    if runner.speculative_config is None or not isinstance(drafter, SpecDecodeBaseProposer):
        raise ValueError("TETRIS needs model-based speculative decoding (speculative_config "
                         f"with method 'draft_model'); drafter is {type(drafter).__name__}")
    if runner.num_spec_tokens != config.num_speculative_tokens:
        raise ValueError(
            f"num_speculative_tokens is {runner.num_spec_tokens} but TetrisConfig(k={config.k}, "
            f"extra={config.extra}) needs k + extra = {config.num_speculative_tokens}")
    fix_cpu_expand_kernel()  # sampled verification is garbage on CPU without it
    stats = TetrisStats(num_speculative_tokens=runner.num_spec_tokens)
    state = _TetrisState(config, stats, core, runner, drafter, core.scheduler)
    targets = {"runner": runner, "drafter": drafter, "scheduler": core.scheduler}
    for (owner, name), method in _PATCHED.items():
        obj = targets[owner]
        state.originals[(owner, name)] = getattr(obj, name)
        state.shadowed[(owner, name)] = name in vars(obj)
        setattr(obj, name, getattr(state, method))
    setattr(core, _STATE_ATTR, state)
    return stats


def set_tetris_config(engine, config: TetrisConfig) -> None:
    """Swap the TETRIS config of an engine (takes effect at the next draft hand-off)."""
    state = getattr(_engine_core(engine), _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("TETRIS is not installed on this engine")
    if config.num_speculative_tokens != state.config.num_speculative_tokens:
        raise ValueError("k + extra must stay equal to the engine's num_speculative_tokens")
    state.config = replace(config)


def uninstall_tetris(engine) -> TetrisStats | None:
    """Restore vLLM's own methods; returns the final stats (None if not installed)."""
    core = _engine_core(engine)
    state = getattr(core, _STATE_ATTR, None)
    if state is None:
        return None
    targets = {"runner": state.runner, "drafter": state.drafter, "scheduler": state.scheduler}
    for (owner, name), original in state.originals.items():
        obj = targets[owner]
        if state.shadowed[(owner, name)]:
            setattr(obj, name, original)  # someone's instance attribute before ours
        else:
            delattr(obj, name)  # the class method shows through again
    setattr(core, _STATE_ATTR, None)
    return state.stats
