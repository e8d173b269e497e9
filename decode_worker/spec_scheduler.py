"""The scheduler side of the speculation hook (vLLM 0.32.0): the decisions and the books.

Installed by ``install_scheduler_hooks(scheduler, config)`` on the engine core's
``Scheduler``, which lives in the engine's process whatever the parallelism.  Everything it
keeps from step to step (the policy's calibration and step-time model, the last decision,
which requests are stale) lives on the ``SchedulerHooks`` object.  Per engine step:

1. ``schedule`` (patched): vLLM schedules; then the policy picks ``K``, how many tokens the
   draft proposes at the end of this step, and writes it to the step's
   ``num_spec_tokens_to_schedule`` (vLLM's dynamic-speculation field, which the runner passes
   to ``drafter.propose``).  ``budget="fixed"``: always ``k + e``.  ``budget="goodput"``:
   SmartSpec (``smartspec.py``); ``K = 0`` skips the draft model, which leaves the step's
   tokens out of the draft's KV: those requests are **stale** from then on (their drafts may
   be worse; calibration keeps them apart).  The step's start time is noted.
2. ``update_from_output`` (patched): the drafts verified in this step are booked (verified,
   accepted) and their outcomes calibrate the confidence map.
3. ``update_draft_token_ids`` (patched, from ``EngineCore.post_step``): the drafts proposed
   this step arrive with their confidences (``DraftScores``, attached by the runner side);
   each is calibrated; the budget is chosen (fixed: ``N * k`` or ``--spec-capacity``;
   goodput: SmartSpec); TETRIS picks which drafts (or, TETRIS off, a uniform length); each
   request's list is trimmed to its prefix before vLLM stores it.  Trimming to a prefix is
   lossless (``spec_adapter.py`` explains why the probabilities stay aligned).  Then the
   step's wall time, from ``schedule`` to here (target, draft, booking, the runner's and our
   own work), feeds the step-time model with the step's size (target tokens, drafting
   requests, ``K``).

Also: ``scheduler.dynamic_sd_lookup`` is set (to ``k + e`` for every batch size), which is
how vLLM knows the number of drafts varies per step; without it vLLM pads every request
entering decode with ``k + e`` placeholder drafts (-1) that are verified for nothing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from decode_worker.calibration import key_index
from decode_worker.smartspec import BudgetPolicy, SmartSpecConfig
from decode_worker.spec_runner import DRAFT_SCORES_ATTR
from decode_worker.spec_stats import StepRecord, TetrisStats
from decode_worker.tetris import TetrisConfig, select_draft_lengths

__all__ = ["SchedulerHooks", "install_scheduler_hooks", "uninstall_scheduler_hooks"]

_HOOKS_ATTR = "_disagg_scheduler_hooks"
_SAMPLING_EPS = 1e-5
_PRUNE_EVERY = 64  # steps between forgetting requests that left


class SchedulerHooks:
    """State and patched methods of one scheduler (see the module docstring)."""

    def __init__(self, scheduler, config: TetrisConfig, stats: TetrisStats,
                 smartspec: SmartSpecConfig | None = None):
        self.scheduler = scheduler
        self.config = config
        self.stats = stats
        self.policy = BudgetPolicy(config.k, config.extra, uniform=not config.enabled,
                                   capacity=config.capacity, config=smartspec)
        self.originals: dict[str, Any] = {}
        self.shadowed: dict[str, bool] = {}
        self.saved_lookup = None
        self.stale: set[str] = set()
        self.pending: dict[str, tuple[int, np.ndarray]] | None = None  # last decision per request
        self.pending_record: StepRecord | None = None
        self.coupled: dict[str, bool] = {}
        self.step: tuple[float, int, int, int] | None = None  # (start, target tokens, N, K)
        self.step_end: float | None = None  # when update_from_output finished with it
        self.proposal_reason = "fixed"
        self.last_k = config.num_speculative_tokens  # what the latest step drafted
        self._steps = 0

    @property
    def k_max(self) -> int:
        return self.config.num_speculative_tokens

    # ----- install

    def patch(self, name: str, replacement) -> None:
        self.originals[name] = getattr(self.scheduler, name)
        self.shadowed[name] = name in vars(self.scheduler)
        setattr(self.scheduler, name, replacement)

    def restore(self) -> None:
        for name, original in self.originals.items():
            if self.shadowed[name]:
                setattr(self.scheduler, name, original)
            else:
                delattr(self.scheduler, name)
        self.originals.clear()
        self.scheduler.dynamic_sd_lookup = self.saved_lookup

    def set_config(self, config: TetrisConfig) -> None:
        self.config = config
        self.policy.uniform = not config.enabled
        self.policy.capacity = config.capacity
        self.stats.budget_mode = config.budget

    # ----- request facts

    def _key(self, req_id: str) -> int:
        req = self.scheduler.requests.get(req_id)
        params = getattr(req, "sampling_params", None)
        if params is None or params.temperature < _SAMPLING_EPS:
            kind = "greedy"
        elif self.coupled.get(req_id, False):
            kind = "coupled"
        else:
            kind = "sampled"
        return key_index(kind, req_id in self.stale)

    def _useful_length(self, req_id: str, proposed: int) -> int:
        """Drafts that can matter: -1 for finished/prefill-chunk requests; otherwise capped by
        the request's remaining max_tokens and the model length (always safe: fewer drafts
        never change the output)."""
        req = self.scheduler.requests.get(req_id)
        if req is None or req.is_finished() or req.is_prefill_chunk:
            return -1
        left = proposed
        if req.max_tokens is not None:
            left = min(left, req.max_tokens - req.num_output_tokens - 1)
        left = min(left, self.scheduler.max_model_len - req.num_tokens - 1)
        return max(left, 0)

    # ----- 1. schedule

    def _observe_step(self, end: float) -> None:
        """Feed the step-time model with the step that started at ``self.step[0]``."""
        start, target_tokens, drafting, k = self.step
        self.step, self.step_end = None, None
        model = self.policy.step_model
        before = model.scored
        model.observe(target_tokens, drafting, k, end - start)
        if model.scored > before:
            with self.stats._lock:
                self.stats.step_time_samples = model.scored
                self.stats.step_time_predicted_sum_s = model.predicted_sum
                self.stats.step_time_measured_sum_s = model.measured_sum
                self.stats.step_time_abs_error_sum_s = model.abs_error_sum

    def schedule(self, *args, **kwargs):
        start = time.perf_counter()
        if self.step is not None and self.step_end is not None:  # no draft hand-off came
            self._observe_step(self.step_end)
        self.step = None
        out = self.originals["schedule"](*args, **kwargs)
        scheduled = out.num_scheduled_tokens
        if not scheduled:
            return out
        drafting = [r for r in scheduled
                    if (req := self.scheduler.requests.get(r)) is not None and not req.is_prefill_chunk]
        if self.config.budget == "fixed":
            k, self.proposal_reason = self.k_max, "fixed"
        else:
            k, self.proposal_reason = self.policy.proposal_length([(r, self._key(r)) for r in drafting])
        out.num_spec_tokens_to_schedule = k
        self.last_k = k
        if k == 0:
            self.stale.update(scheduled)
        self.step = (start, out.total_num_scheduled_tokens, len(drafting), k)
        with self.stats._lock:
            self.stats.proposal_length_steps[k] += 1
            self.stats.draft_skipped_steps += k == 0
            self.stats.explorations += self.proposal_reason == "explore"
        return out

    # ----- 2. update_from_output

    def update_from_output(self, scheduler_output, model_runner_output):
        self._book(scheduler_output, model_runner_output)
        outputs = self.originals["update_from_output"](scheduler_output, model_runner_output)
        for eco in (outputs or {}).values():
            sched_stats = getattr(eco, "scheduler_stats", None)
            sds = getattr(sched_stats, "spec_decoding_stats", None)
            if sds is not None:
                with self.stats._lock:
                    self.stats.vllm_stats_seen = True
                    self.stats.vllm_draft_tokens += sds.num_draft_tokens
                    self.stats.vllm_accepted_tokens += sds.num_accepted_tokens
        if self.step is not None:
            self.step_end = time.perf_counter()
        self._steps += 1
        if self._steps % _PRUNE_EVERY == 0:
            live = set(self.scheduler.requests)
            self.stale &= live
            self.coupled = {r: c for r, c in self.coupled.items() if r in live}
            self.policy.forget(live)
        return outputs

    def _book(self, scheduler_output, model_runner_output) -> None:
        pending, record = self.pending, self.pending_record
        self.pending, self.pending_record = None, None
        if pending is None:
            return
        verified = accepted = reqs = coupled = 0
        num_sampled = getattr(self.scheduler, "num_sampled_tokens_per_step", 1)
        spec = scheduler_output.scheduled_spec_decode_tokens
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        keys, confs, ns, accs = [], [], [], []
        for req_id in scheduler_output.num_scheduled_tokens:
            if req_id not in pending:
                continue
            reqs += 1
            drafts = spec.get(req_id) or []
            if not drafts:
                continue
            i = index.get(req_id)
            generated = sampled[i] if sampled and i is not None else []
            if not generated:
                continue  # e.g. discarded: nothing was decided
            n = len(drafts)
            a = max(len(generated) - num_sampled, 0)
            verified += n
            accepted += a
            key, conf = pending[req_id]
            coupled += self.coupled.get(req_id, False)
            if conf is not None:
                keys.append(key)
                confs.append(conf)
                ns.append(n)
                accs.append(a)
        if record is not None:
            record.verified, record.accepted, record.verified_requests = verified, accepted, reqs
        learned = 0
        calibrator = self.policy.calibrator
        if keys:
            width = max(len(c) for c in confs)
            matrix = np.full((len(confs), width), np.nan)
            for row, conf in enumerate(confs):
                matrix[row, :len(conf)] = conf
            learned = calibrator.update(keys, matrix, ns, accs)
        with self.stats._lock:
            self.stats.verified += verified
            self.stats.accepted += accepted
            self.stats.verified_request_steps += reqs
            self.stats.coupled_request_steps += coupled
            if record is not None:
                self.stats.expected_accepted += record.expected_accepted
            if learned:
                self.stats.calibration_observations = calibrator.observations
                self.stats.calibration_brier_raw = calibrator.brier_raw
                self.stats.calibration_brier_calibrated = calibrator.brier_calibrated

    # ----- 3. update_draft_token_ids

    def update_draft_token_ids(self, draft_token_ids):
        trimmed = self._trim(draft_token_ids)
        result = self.originals["update_draft_token_ids"](trimmed)
        if self.step is not None:
            # A step's time: schedule -> target -> draft -> booking -> draft hand-off (everything
            # the engine core does for it, our own work included).
            self._observe_step(time.perf_counter())
        return result

    def _trim(self, out):
        from vllm.v1.outputs import DraftTokenIds

        config = self.config
        req_ids = list(out.req_ids)
        drafts = [list(d) for d in out.draft_token_ids]
        if not req_ids:
            return out
        scores = getattr(out, DRAFT_SCORES_ATTR, None)
        if scores is not None:
            self.coupled.update(zip(req_ids, scores.coupled, strict=True))
        useful = [self._useful_length(r, len(d)) for r, d in zip(req_ids, drafts, strict=True)]
        live = [i for i, u in enumerate(useful) if u >= 0]
        n = len(live)
        lengths = [0] * len(req_ids)
        source, reason, capacity, expected = "window", config.budget, config.k * n, 0.0
        calibrated = keys = raw = None
        proposed = sum(len(drafts[i]) for i in live)
        if n and proposed:
            valid = np.array([useful[i] for i in live], dtype=np.int64)
            keys = np.array([self._key(req_ids[i]) for i in live], dtype=np.int64)
            if scores is not None and scores.log_probs is not None:
                source = scores.source
                raw = np.exp(np.array([scores.log_probs[i] for i in live], dtype=np.float64))
                calibrated = self.policy.calibrator.predict(keys, raw) if config.calibrate else raw
                with np.errstate(divide="ignore"):
                    ranked = np.log(calibrated)
            if config.budget == "goodput":
                if calibrated is None:
                    chosen, reason = np.zeros(n, dtype=np.int64), "no-confidence"
                else:
                    # The next step is expected to draft as many as this one did.
                    choice = self.policy.choose(ranked, valid, self.last_k,
                                                warmup=self.proposal_reason == "warmup")
                    chosen, reason, capacity = choice.lengths, choice.reason, choice.budget
            elif calibrated is None or not config.enabled or n < config.min_batch_size:
                chosen, source = np.minimum(valid, config.k), "window"
            else:
                capacity = config.capacity_for(n)
                chosen = select_draft_lengths(ranked, capacity, valid_lengths=valid)
            for i, length in zip(live, chosen.tolist(), strict=True):
                lengths[i] = int(length)
            if calibrated is not None:
                self.policy.remember([req_ids[i] for i in live], keys, calibrated)
                cols = np.arange(calibrated.shape[1])[None, :]
                prefix = np.cumprod(np.nan_to_num(calibrated, nan=0.0), axis=1)
                expected = float(np.where(cols < np.asarray(chosen)[:, None], prefix, 0.0).sum())
        elif n:
            reason = "no-drafts"
        trimmed = [d[:length] for d, length in zip(drafts, lengths, strict=True)]
        pending = {}
        if n:
            for row, i in enumerate(live):
                conf = raw[row, :lengths[i]] if raw is not None else None
                pending[req_ids[i]] = (int(keys[row]) if keys is not None else self._key(req_ids[i]), conf)
        record = StepRecord(num_requests=n, capacity=int(capacity), proposed=proposed, planned=sum(lengths),
                            source=source, lengths=[lengths[i] for i in live], reason=reason,
                            expected_accepted=expected)
        with self.stats._lock:
            if n:
                self.stats.steps += 1
                self.stats.request_steps += n
                self.stats.proposed += record.proposed
                self.stats.planned += record.planned
                self.stats.window_fallbacks += source == "window" and record.proposed > 0
                self.stats.add_budget(record.planned)
                self.stats.history.append(record)
        self.pending = pending if n else None
        self.pending_record = record if n else None
        return DraftTokenIds(req_ids, trimmed)


def install_scheduler_hooks(scheduler, config: TetrisConfig, smartspec: SmartSpecConfig | None = None
                            ) -> SchedulerHooks:
    """Patch one vLLM ``Scheduler``; returns the hooks (their ``stats`` are the live counters)."""
    if getattr(scheduler, _HOOKS_ATTR, None) is not None:
        raise RuntimeError("the speculation hook is already installed on this scheduler")
    stats = TetrisStats(num_speculative_tokens=config.num_speculative_tokens, budget_mode=config.budget)
    hooks = SchedulerHooks(scheduler, config, stats, smartspec)
    hooks.saved_lookup = scheduler.dynamic_sd_lookup
    # Any list indexed by batch size makes vLLM treat the draft count as per-step (no padding);
    # schedule() overwrites the step's value anyway.
    scheduler.dynamic_sd_lookup = [config.num_speculative_tokens] * (scheduler.max_num_running_reqs + 2)
    for name in ("schedule", "update_from_output", "update_draft_token_ids"):
        hooks.patch(name, getattr(hooks, name))
    setattr(scheduler, _HOOKS_ATTR, hooks)
    return hooks


def uninstall_scheduler_hooks(scheduler) -> SchedulerHooks | None:
    hooks = getattr(scheduler, _HOOKS_ATTR, None)
    if hooks is None:
        return None
    hooks.restore()
    setattr(scheduler, _HOOKS_ATTR, None)
    return hooks
