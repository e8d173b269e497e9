"""The runner side of the speculation hook (vLLM 0.32.0): what runs where the models run.

Installed by ``install_runner_hooks(runner)`` on one ``GPUModelRunner`` (the CPU runner is a
subclass).  With tensor parallelism vLLM's runner lives in each rank's process: install it
there (e.g. through ``collective_rpc``); everything it keeps from step to step lives on the
``RunnerHooks`` object next to the runner, and what the scheduler side needs travels in the
objects vLLM already passes: the proposal length arrives as
``scheduler_output.num_spec_tokens_to_schedule`` (vLLM's dynamic-speculation field, the
``num_speculative_tokens`` argument of ``drafter.propose``), and the drafts leave with their
confidences attached (``DraftScores`` on the ``DraftTokenIds`` that ``take_draft_token_ids``
returns, picklable).

Patched instance attributes (never a class):

* ``runner.propose_draft_token_ids``: with ``num_spec_tokens_to_schedule == 0`` the draft
  model does not run at all (vLLM would still run its first pass to keep the draft's KV in
  step); no drafts.  The tokens of that step are then missing from the draft's KV, which can
  only make its later drafts worse, never the output (``spec_scheduler.py`` marks such
  requests stale).
* ``drafter.propose``: resets the per-proposal records below.
* ``drafter._greedy_sample`` (all-greedy batches, where vLLM keeps no draft probabilities):
  vLLM's default branch (argmax of the draft logits) plus the log-softmax of the chosen
  token, recorded per draft position.  Other branches call vLLM's own and record nothing.
* ``drafter._sample_from_logits`` (batches that are not all greedy): after vLLM's own draw,
  the rows of seeded requests get their coupled draft token (``seeded_sampling.py``).
* ``runner._sample``: after vLLM's sampling or rejection sampling, the rows of seeded requests
  get their coupled tokens.  A step that verifies no draft at all uses vLLM's plain sampler
  (same tokens, a fraction of the rejection sampler's work).
* ``runner.take_draft_token_ids``: attaches ``DraftScores`` (log-probability of every proposed
  token, and which rows were coupled) to vLLM's ``DraftTokenIds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from decode_worker.seeded_sampling import (
    NoiseStreams,
    coupled_emit,
    coupling_unsupported,
    gumbel_argmax,
    process_logits,
)

__all__ = ["DRAFT_SCORES_ATTR", "DraftScores", "RunnerHooks", "install_runner_hooks", "uninstall_runner_hooks"]

# Attribute of vLLM's DraftTokenIds carrying our DraftScores (a dataclass instance pickles its
# __dict__, so it survives the trip from a rank process to the engine core).
DRAFT_SCORES_ATTR = "disagg_draft_scores"
_HOOKS_ATTR = "_disagg_runner_hooks"


@dataclass
class DraftScores:
    """Per row of ``DraftTokenIds``: the draft log-probability of each proposed token (NaN past
    the row's drafts), where it came from, and whether the row was drafted coupled."""

    log_probs: list[list[float]] | None  # None: no confidence this step
    source: str  # "probs" | "greedy" | "none"
    coupled: list[bool]


class RunnerHooks:
    """State and patched methods of one model runner (see the module docstring)."""

    def __init__(self, runner):
        self.runner = runner
        self.drafter = runner.drafter
        self.originals: dict[tuple[str, str], Any] = {}
        self.shadowed: dict[tuple[str, str], bool] = {}
        self.greedy_log_probs: list | None = None  # per draft position: [B] tensor or None
        self.noise = NoiseStreams()
        # req_id -> output position of the first draft proposed at the end of this step.
        self.next_position: dict[str, int] = {}
        self.coupled_now: set[str] = set()  # requests drafted coupled in the current proposal
        self.draft_step = 0
        self.use_fused = None  # None: decided per call (CPU with vLLM's op -> fused)

    # ----- install

    def patch(self, owner: str, obj, name: str, replacement) -> None:
        self.originals[(owner, name)] = getattr(obj, name)
        self.shadowed[(owner, name)] = name in vars(obj)
        setattr(obj, name, replacement)

    def restore(self) -> None:
        targets = {"runner": self.runner, "drafter": self.drafter}
        for (owner, name), original in self.originals.items():
            obj = targets[owner]
            if self.shadowed[(owner, name)]:
                setattr(obj, name, original)
            else:
                delattr(obj, name)
        self.originals.clear()

    def _original(self, owner: str, name: str):
        return self.originals[(owner, name)]

    # ----- seeded requests

    def _seeded_params(self, req_id: str):
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        return None if coupling_unsupported(params) else params

    def _output_count(self, req_id: str) -> int:
        return len(self.runner.requests[req_id].output_token_ids)

    # ----- drafter patches

    def propose(self, *args, **kwargs):
        self.greedy_log_probs = []
        self.draft_step = 0
        self.coupled_now = set()
        return self._original("drafter", "propose")(*args, **kwargs)

    def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
        if scheduler_output.num_spec_tokens_to_schedule == 0:
            # Skip the draft model entirely (see the module docstring), and the drafter's input
            # preparation with it (in synchronous scheduling nothing else reads it).
            runner = self.runner
            runner._draft_probs = runner._draft_prob_req_ids = None
            self.greedy_log_probs, self.coupled_now = None, set()
            return torch.empty((runner.input_batch.num_reqs, 0), dtype=torch.int64, device=runner.device)
        return self._original("runner", "propose_draft_token_ids")(scheduler_output, *args, **kwargs)

    def greedy_sample(self, hidden_states):
        drafter = self.drafter
        if drafter.use_local_argmax_reduction or getattr(drafter, "use_heterogeneous_vocab", False):
            ids = self._original("drafter", "_greedy_sample")(hidden_states)
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

    def sample_from_logits(self, logits, sampling_metadata):
        step, self.draft_step = self.draft_step, self.draft_step + 1
        original = self._original("drafter", "_sample_from_logits")
        if getattr(self.drafter, "use_heterogeneous_vocab", False):
            return original(logits, sampling_metadata)
        req_ids = self.runner.input_batch.req_ids
        rows = []
        for i, req_id in enumerate(req_ids[: logits.shape[0]]):
            params = self._seeded_params(req_id)
            if params is not None and req_id in self.next_position:
                rows.append((i, req_id, params))
        if not rows:
            return original(logits, sampling_metadata)
        saved = logits[[i for i, _, _ in rows]].detach().clone()  # vLLM divides logits in place
        ids, probs = original(logits, sampling_metadata)
        ids = ids.clone()
        for r, (i, req_id, params) in enumerate(rows):
            position = self.next_position[req_id] + step
            seeds = self.noise.seeds(req_id, params.seed, [position])
            token = gumbel_argmax(process_logits(saved[r:r + 1], params, position), seeds, use_fused=self.use_fused)
            ids[i] = token[0].to(ids.dtype)
            self.coupled_now.add(req_id)
        return ids, probs

    # ----- runner patches

    def sample(self, logits, spec_decode_metadata):
        runner = self.runner
        original = self._original("runner", "_sample")
        req_ids = runner.input_batch.req_ids
        num_reqs = len(req_ids)
        discard = runner.discard_request_mask.np[:num_reqs]
        rows = []
        for i, req_id in enumerate(req_ids):
            if discard[i]:
                continue
            params = self._seeded_params(req_id)
            if params is not None:
                rows.append((i, req_id, params))
        self.next_position = {}
        if rows and logits is not None:
            self.noise.keep_only(set(runner.requests))
            if spec_decode_metadata is None:
                index = {i: ([], [i]) for i, _, _ in rows}
            else:
                cu = spec_decode_metadata.cu_num_draft_tokens.tolist()
                target = spec_decode_metadata.target_logits_indices.tolist()
                bonus = spec_decode_metadata.bonus_logits_indices.tolist()
                drafts = spec_decode_metadata.draft_token_ids.tolist()
                index = {}
                for i, _, _ in rows:
                    start = cu[i - 1] if i else 0
                    index[i] = (drafts[start:cu[i]], target[start:cu[i]] + [bonus[i]])
            saved = {i: logits[index[i][1]].detach().clone() for i, _, _ in rows}
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            # Nothing to verify: vLLM's plain sampler gives the same tokens as its rejection
            # sampler (one row per request, in order), for a fraction of the work.
            spec_decode_metadata = None
        output = original(logits, spec_decode_metadata)
        if not rows or logits is None:
            return output
        sampled = output.sampled_token_ids
        width = sampled.shape[1]
        for i, req_id, params in rows:
            drafts, _ = index[i]
            first = self._output_count(req_id)
            seeds = self.noise.seeds(req_id, params.seed, range(first, first + len(drafts) + 1))
            targets = gumbel_argmax(process_logits(saved[i], params, first), seeds, use_fused=self.use_fused)
            emitted = coupled_emit(drafts, targets.tolist())
            row = torch.full((width,), -1, dtype=sampled.dtype, device=sampled.device)
            row[: len(emitted)] = torch.tensor(emitted, dtype=sampled.dtype)
            sampled[i] = row
            self.noise.emitted(req_id, first)
            self.next_position[req_id] = first + len(emitted)
        return output

    def _draft_log_probs(self, req_ids: list[str], drafts: list[list[int]]):
        """``[B, K]`` float64 log-probabilities of the proposed tokens, and their source."""
        width = max((len(d) for d in drafts), default=0)
        if width == 0:
            return None, "none"
        runner = self.runner
        probs, prob_ids = runner._draft_probs, runner._draft_prob_req_ids
        if probs is not None and prob_ids is not None:
            row_of = {r: i for i, r in enumerate(prob_ids)}
            if all(r in row_of for r in req_ids) and probs.shape[1] >= width:
                dev = probs.device
                rows = torch.tensor([row_of[r] for r in req_ids], dtype=torch.long, device=dev)
                pos = torch.arange(width, dtype=torch.long, device=dev)
                tok = torch.tensor([d + [0] * (width - len(d)) for d in drafts], dtype=torch.long, device=dev)
                # [B, width]: the draft probability of each proposed token (no [B, K, V] copy).
                picked = probs[rows[:, None], pos[None, :], tok]
                return torch.log(picked.double()).cpu().numpy(), "probs"
        # All-greedy batch: the confidences captured by greedy_sample, one [B] tensor per
        # draft position, rows in the order the drafter saw the batch (= req_ids).
        cap = self.greedy_log_probs
        if cap and len(cap) >= width and all(t is not None for t in cap[:width]) \
                and all(t.shape[0] == len(req_ids) for t in cap[:width]):
            return torch.stack(cap[:width], dim=1).double().cpu().numpy(), "greedy"
        return None, "none"

    def take_draft_token_ids(self):
        out = self._original("runner", "take_draft_token_ids")()
        try:
            if out is None:
                return out
            req_ids = list(out.req_ids)
            drafts = [list(d) for d in out.draft_token_ids]
            lp, source = self._draft_log_probs(req_ids, drafts)
            rows = None
            if lp is not None:
                lengths = np.array([len(d) for d in drafts])
                lp = np.where(np.arange(lp.shape[1])[None, :] < lengths[:, None], lp, np.nan)
                rows = lp.tolist()
            setattr(out, DRAFT_SCORES_ATTR, DraftScores(rows, source, [r in self.coupled_now for r in req_ids]))
            return out
        finally:
            self.greedy_log_probs = None  # this step's confidences are used up


_PATCHES = (
    ("drafter", "propose", "propose"),
    ("runner", "propose_draft_token_ids", "propose_draft_token_ids"),
    ("drafter", "_greedy_sample", "greedy_sample"),
    ("drafter", "_sample_from_logits", "sample_from_logits"),
    ("runner", "_sample", "sample"),
    ("runner", "take_draft_token_ids", "take_draft_token_ids"),
)


def install_runner_hooks(runner) -> RunnerHooks:
    """Patch one model runner (and its drafter); returns the hooks (``uninstall_runner_hooks``
    restores vLLM's methods)."""
    if getattr(runner, _HOOKS_ATTR, None) is not None:
        raise RuntimeError("the speculation hook is already installed on this model runner")
    hooks = RunnerHooks(runner)
    targets = {"runner": runner, "drafter": runner.drafter}
    for owner, name, method in _PATCHES:
        hooks.patch(owner, targets[owner], name, getattr(hooks, method))
    setattr(runner, _HOOKS_ATTR, hooks)
    return hooks


def uninstall_runner_hooks(runner) -> RunnerHooks | None:
    hooks = getattr(runner, _HOOKS_ATTR, None)
    if hooks is None:
        return None
    hooks.restore()
    setattr(runner, _HOOKS_ATTR, None)
    return hooks
