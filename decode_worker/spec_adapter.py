"""Speculation inside vLLM's draft-model speculative decoding: the pins and the engine-level
install, for vLLM 0.32.0.

The hook has two halves that never reach into each other (with tensor parallelism they run in
different processes):

* the **runner side** (``spec_runner.py``, ``install_runner_hooks(runner)``): skips the
  draft model on steps that propose nothing, records the draft's confidence, couples seeded
  requests' sampling (``seeded_sampling.py``) and attaches the confidences to the drafts;
* the **scheduler side** (``spec_scheduler.py``, ``install_scheduler_hooks(scheduler,
  config)``): chooses each step's proposal length and verification budget (SmartSpec,
  ``smartspec.py``, or the fixed ``N * k``), picks the drafts (TETRIS, ``tetris.py``, on
  calibrated probabilities, ``calibration.py``), trims the lists, books what was verified
  and accepted, times the steps (``step_time.py``) and keeps the counters
  (``spec_stats.py``).

``install_tetris(engine, config)`` installs both on an in-process engine (uniprocess
executor) or, with tensor parallelism, in every rank of vLLM's multiprocess executor
(``collective_rpc`` runs ``install_in_rank`` there; the drafts' confidences come back on the
output rank's ``DraftTokenIds``, which every rank computes alike).

How one engine step of vLLM 0.32.0 runs, in ``EngineCore``:

1. ``step``: ``Scheduler.schedule`` -> ``GPUModelRunner.execute_model`` / ``sample_tokens``,
   which verifies the drafts scheduled this step (``_sample``: the rejection sampler) and
   then calls ``propose_draft_token_ids``: the drafter (``SpecDecodeBaseProposer.propose``)
   proposes ``scheduler_output.num_spec_tokens_to_schedule`` tokens per request; with
   ``draft_sample_method="probabilistic"`` and a batch that is not all-greedy it keeps the
   full-vocabulary draft distributions, which the runner stores as ``_draft_probs``
   ``[num_reqs, K, V]`` with their row ids ``_draft_prob_req_ids``; then
   ``Scheduler.update_from_output`` books the step (accepted tokens).
2. ``post_step``: ``model_executor.take_draft_token_ids()`` ->
   ``GPUModelRunner.take_draft_token_ids`` returns ``DraftTokenIds(req_ids, lists)``, which
   ``Scheduler.update_draft_token_ids`` stores as each request's ``spec_token_ids``; the
   next ``schedule`` sends them to verification.

Trimming each request's list to a prefix is lossless: at verification
``GPUModelRunner._get_spec_decode_draft_probs`` slices ``_draft_probs[row, :num_draft]`` by
request id, so the kept probabilities stay aligned with the kept tokens; greedy requests
verify by exact match; seeded requests verify by coupled sampling.

``check_vllm_internals()`` asserts every attribute, signature and source fact both halves use
and names what moved.  See ``tests/unit/decode_worker/test_spec_adapter.py``.

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
import os
from dataclasses import replace

from cluster.engine.vllm_cpu_fix import cpu_fix_problems, fix_cpu_expand_kernel, fix_top_k_without_drafts
from cluster.engine.vllm_pin import PINNED_VLLM_VERSION, VllmInternalsError, check_vllm_version
from decode_worker.smartspec import SmartSpecConfig
from decode_worker.spec_runner import RunnerHooks, install_runner_hooks, uninstall_runner_hooks
from decode_worker.spec_scheduler import SchedulerHooks, install_scheduler_hooks, uninstall_scheduler_hooks
from decode_worker.spec_stats import StepRecord, TetrisStats
from decode_worker.tetris import TetrisConfig

__all__ = [
    "PINNED_VLLM_VERSION",
    "StepRecord",
    "TetrisStats",
    "VllmInternalsError",
    "check_vllm_internals",
    "check_vllm_version",
    "fix_cpu_expand_kernel",
    "install_runner_hooks",
    "install_scheduler_hooks",
    "install_in_rank",
    "install_tetris",
    "model_runner_of",
    "set_tetris_config",
    "uninstall_tetris",
]

# sha256 of inspect.getsource(SpecDecodeBaseProposer._greedy_sample) in vLLM 0.32.0: the
# adapter re-implements its default branch, so any edit to it must be reviewed.
_GREEDY_SAMPLE_SHA256 = "e539abab1b225d277b31b48d90b95e45a7c38f3750080eb12d75ace9bcb174d8"


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
        from vllm import SamplingParams
        from vllm.v1.core.sched.output import SchedulerOutput
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.engine.core_client import InprocClient
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor, WorkerProc
        from vllm.v1.executor.uniproc_executor import UniProcExecutor
        from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
        from vllm.v1.request import Request
        from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
        from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler, apply_top_k_top_p
        from vllm.v1.sample.sampler import Sampler
        from vllm.v1.spec_decode.draft_model import DraftModelProposer
        from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
        from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
        from vllm.v1.spec_decode.metrics import SpecDecodingStats
        from vllm.v1.worker.gpu_input_batch import CachedRequestState
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
    # Tensor parallelism: install_in_rank travels to every rank as a pickled callable that
    # receives the rank's worker wrapper, which forwards attributes to the worker.
    need("cloudpickle.dumps(method" in src(MultiprocExecutor.collective_rpc),
         "MultiprocExecutor.collective_rpc sending callables with cloudpickle")
    need("partial(cloudpickle.loads(method), self.worker)" in src(WorkerProc._execute_worker_rpc),
         "WorkerProc._execute_worker_rpc calling a callable with the rank's worker wrapper")
    need("return getattr(self.worker, attr)" in src(WorkerWrapperBase.__getattr__),
         "WorkerWrapperBase.__getattr__ forwarding to the worker")
    need("unique_reply_rank=self.output_rank" in src(MultiprocExecutor.take_draft_token_ids),
         "MultiprocExecutor.take_draft_token_ids answering from the output rank")

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

    # SmartSpec: the per-step proposal length and skipping the draft (spec_runner/scheduler).
    sched_fields = getattr(SchedulerOutput, "__dataclass_fields__", {})
    need("num_spec_tokens_to_schedule" in sched_fields, "SchedulerOutput.num_spec_tokens_to_schedule")
    need("num_speculative_tokens=num_spec_tokens_to_schedule" in propose_src,
         "GPUModelRunner.propose_draft_token_ids passing scheduler_output.num_spec_tokens_to_schedule "
         "to drafter.propose(num_speculative_tokens=...)")
    schedule_src = src(Scheduler.schedule)
    need("self.dynamic_sd_lookup is None" in schedule_src
         and "num_spec_tokens_to_schedule=num_spec_tokens_to_schedule" in schedule_src,
         "Scheduler.schedule: placeholder-draft padding only without dynamic_sd_lookup, and "
         "num_spec_tokens_to_schedule in the SchedulerOutput")
    for attr in ("self.dynamic_sd_lookup", "self.max_num_running_reqs"):
        need(attr in sched_init, f"Scheduler.__init__ sets {attr}")
    need({"common_attn_metadata", "next_token_ids"} <= set(propose_params),
         "SpecDecodeBaseProposer.propose(..., next_token_ids, common_attn_metadata, ...)")
    need("self._last_draft_probs = None" in src(SpecDecodeBaseProposer.propose)
         and "return self._last_draft_probs" in src(SpecDecodeBaseProposer.take_last_draft_probs),
         "SpecDecodeBaseProposer._last_draft_probs behind take_last_draft_probs()")
    try:
        from vllm.v1.attention.backend import CommonAttentionMetadata
        need(callable(getattr(CommonAttentionMetadata, "batch_size", None)),
             "CommonAttentionMetadata.batch_size()")
    except ImportError:
        problems.append("vllm.v1.attention.backend.CommonAttentionMetadata moved")
    need("if self.check_for_draft_tokens and not self.async_scheduling" in post_step,
         "EngineCore.post_step checking check_for_draft_tokens")
    need("self.scheduler.schedule(" in src(EngineCore.step), "EngineCore.step calling scheduler.schedule")

    # Seeded requests: coupled sampling (seeded_sampling.py) mirrors vLLM's CPU sampler.
    need(_params(SpecDecodeBaseProposer._sample_from_logits) == ["self", "logits", "sampling_metadata"]
         and "self._sample_from_logits(" in src(SpecDecodeBaseProposer._sample_draft_tokens),
         "SpecDecodeBaseProposer._sample_from_logits(self, logits, sampling_metadata) called by "
         "_sample_draft_tokens")
    need(_params(GPUModelRunner._sample) == ["self", "logits", "spec_decode_metadata"],
         "GPUModelRunner._sample(self, logits, spec_decode_metadata)")
    sample_src = src(GPUModelRunner._sample)
    need("self.sampler(" in sample_src and "self.rejection_sampler(" in sample_src
         and "if spec_decode_metadata is None:" in sample_src,
         "GPUModelRunner._sample: self.sampler without spec_decode_metadata, else self.rejection_sampler")
    need(_params(GPUModelRunner.propose_draft_token_ids)[:2] == ["self", "scheduler_output"]
         and propose_src.index("self._draft_probs = None") < propose_src.index("self.drafter"),
         "GPUModelRunner.propose_draft_token_ids(self, scheduler_output, ...) clearing _draft_probs "
         "before drafting (spec_runner skips it whole when nothing is proposed)")
    need("if self.use_async_scheduling:\n                self.valid_sampled_token_count_event = torch.Event()"
         in runner_init and "if self.valid_sampled_token_count_event is None:\n            return"
         in src(GPUModelRunner._copy_valid_sampled_token_count),
         "GPUModelRunner: the drafter's sampled-token count is only kept under async scheduling")
    need("req_state.output_token_ids.extend(sampled_ids)" in src(GPUModelRunner._bookkeeping_sync),
         "GPUModelRunner._bookkeeping_sync appending the step's tokens to output_token_ids after "
         "sampling (the output position of a sample)")
    need("self.discard_request_mask" in runner_init and "self.requests" in runner_init,
         "GPUModelRunner.discard_request_mask / requests")
    need({"draft_token_ids", "cu_num_draft_tokens", "target_logits_indices", "bonus_logits_indices"}
         <= set(getattr(SpecDecodeMetadata, "__dataclass_fields__", {})),
         "SpecDecodeMetadata.draft_token_ids / cu_num_draft_tokens / target_logits_indices / "
         "bonus_logits_indices")
    need({"sampling_params", "output_token_ids"} <= set(getattr(CachedRequestState, "__dataclass_fields__", {})),
         "CachedRequestState.sampling_params / output_token_ids")
    cpu_sampler = src(TopKTopPSampler.forward_cpu)
    need("apply_top_k_top_p(logits, k, p)" in cpu_sampler
         and "torch.randint(\n                0, 2**31, (1,), generator=gen, dtype=torch.long\n            ).item()"
         in cpu_sampler
         and "torch.ops._C.fused_gumbel_argmax(logits_f32, seeds)" in cpu_sampler,
         "TopKTopPSampler.forward_cpu: top-k/top-p, then one randint(0, 2**31) seed per request "
         "from its generator, then fused_gumbel_argmax (what seeded_sampling.py reproduces)")
    sampler_sample = src(Sampler.sample)
    need(sampler_sample.index("self.apply_temperature(") < sampler_sample.index("self.topk_topp_sampler("),
         "Sampler.sample applying temperature before top-k/top-p sampling")
    need("logits.div_(temp.unsqueeze(dim=1))" in src(Sampler.apply_temperature),
         "Sampler.apply_temperature dividing the logits by the temperature")
    need(_params(apply_top_k_top_p) == ["logits", "k", "p"], "apply_top_k_top_p(logits, k, p)")
    min_tokens = src(MinTokensLogitsProcessor)
    need("params.all_stop_token_ids" in min_tokens and "len(output_tok_ids) >= min_tokens" in min_tokens,
         "MinTokensLogitsProcessor masking all_stop_token_ids below min_tokens outputs")
    for attr in ("seed", "temperature", "top_k", "top_p", "min_p", "min_tokens", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "logit_bias", "allowed_token_ids",
                 "bad_words", "logprobs", "all_stop_token_ids"):
        need(hasattr(SamplingParams, attr) or attr in getattr(SamplingParams, "__struct_fields__", ()),
             f"SamplingParams.{attr}")

    problems.extend(cpu_fix_problems())

    if problems:
        raise VllmInternalsError(
            "vLLM internals used by decode_worker/spec_adapter.py (spec_runner, spec_scheduler, "
            "seeded_sampling) moved:\n  - "
            + "\n  - ".join(problems))


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


# --------------------------------------------------------------------------- install


_STATE_ATTR = "_disagg_tetris_state"


def _check_runner(runner, num_speculative_tokens: int) -> None:
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise VllmInternalsError(
            f"TETRIS hooks the V1 model runner (GPUModelRunner), found {type(runner).__module__}."
            f"{type(runner).__name__}; set VLLM_USE_V2_MODEL_RUNNER=0")
    drafter = getattr(runner, "drafter", None)
    if runner.speculative_config is None or not isinstance(drafter, SpecDecodeBaseProposer):
        raise ValueError("TETRIS needs model-based speculative decoding (speculative_config "
                         f"with method 'draft_model'); drafter is {type(drafter).__name__}")
    if runner.num_spec_tokens != num_speculative_tokens:
        raise ValueError(
            f"num_speculative_tokens is {runner.num_spec_tokens} but the speculation config needs "
            f"k + extra = {num_speculative_tokens}")
    if getattr(runner.speculative_config, "parallel_drafting", False):
        raise ValueError("parallel drafting proposes every token in one pass; TETRIS expects "
                         "sequential draft-model proposals")


def install_in_rank(worker, num_speculative_tokens: int) -> int:
    """The runner side in one rank's process: ``worker`` is vLLM's worker wrapper (the
    in-process executor's ``driver_worker``, or what ``collective_rpc`` hands a callable in
    each rank of the multiprocess executor).  Returns the rank's pid."""
    _install_runner_side(worker.model_runner, num_speculative_tokens)
    return os.getpid()


def _install_runner_side(runner, num_speculative_tokens: int) -> RunnerHooks:
    _check_runner(runner, num_speculative_tokens)
    fix_cpu_expand_kernel()  # sampled verification is garbage on CPU without it (per process)
    fix_top_k_without_drafts()  # top-k in a step without drafts crashes without it
    return install_runner_hooks(runner)


def uninstall_in_rank(worker) -> None:
    uninstall_runner_hooks(worker.model_runner)


# A rank that does not answer the install within this long fails the engine's start.
_RANK_RPC_TIMEOUT_S = 120.0


def install_tetris(engine, config: TetrisConfig, smartspec: SmartSpecConfig | None = None) -> TetrisStats:
    """Apply the speculation policy to ``engine`` (a ``vllm.v1.engine.llm_engine.LLMEngine``
    built with the in-process core and ``speculative_config(draft, config)``); returns its live
    stats.  Patches instance attributes only (see the module docstring); ``uninstall_tetris``
    restores them; ``set_tetris_config`` swaps the config between steps.  With tensor
    parallelism (vLLM's multiprocess executor) the runner side is installed in every rank."""
    check_vllm_internals()
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
    executor = core.model_executor
    fix_cpu_expand_kernel()
    fix_top_k_without_drafts()
    runner_hooks: RunnerHooks | None = None
    if hasattr(executor, "driver_worker"):  # one rank, in this process
        runner_hooks = _install_runner_side(model_runner_of(engine), config.num_speculative_tokens)
    else:  # one process per rank: vLLM's workers run the install and answer with their pids
        executor.collective_rpc(install_in_rank, timeout=_RANK_RPC_TIMEOUT_S,
                                args=(config.num_speculative_tokens,))
    scheduler_hooks = install_scheduler_hooks(core.scheduler, config, smartspec)
    setattr(core, _STATE_ATTR, (runner_hooks, scheduler_hooks))
    return scheduler_hooks.stats


def installed_hooks(engine) -> tuple[RunnerHooks | None, SchedulerHooks] | None:
    """The (runner, scheduler) hooks of an engine, or None; the runner's are None when they
    live in the rank processes (tensor parallelism)."""
    return getattr(_engine_core(engine), _STATE_ATTR, None)


def set_tetris_config(engine, config: TetrisConfig) -> None:
    """Swap the config of an engine (takes effect at the next step)."""
    hooks = installed_hooks(engine)
    if hooks is None:
        raise RuntimeError("TETRIS is not installed on this engine")
    scheduler_hooks = hooks[1]
    if config.num_speculative_tokens != scheduler_hooks.config.num_speculative_tokens:
        raise ValueError("k + extra must stay equal to the engine's num_speculative_tokens")
    scheduler_hooks.set_config(replace(config))


def uninstall_tetris(engine) -> TetrisStats | None:
    """Restore vLLM's own methods; returns the final stats (None if not installed)."""
    core = _engine_core(engine)
    hooks = getattr(core, _STATE_ATTR, None)
    if hooks is None:
        return None
    if hooks[0] is not None:
        uninstall_runner_hooks(hooks[0].runner)
    else:
        core.model_executor.collective_rpc(uninstall_in_rank, timeout=_RANK_RPC_TIMEOUT_S)
    uninstall_scheduler_hooks(hooks[1].scheduler)
    setattr(core, _STATE_ATTR, None)
    return hooks[1].stats
