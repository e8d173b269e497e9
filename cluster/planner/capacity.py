"""A profile's capacity model: what one instance sustains, for the autoscaler
(router/autoscaler.py `CapacityModel`) and for quick bounds in the planner.

    prompt tokens/s   a step full of prompts (the token budget, `max_num_batched_tokens`, of
                      prompts of the mean length) divided by the step's cost
    output tokens/s   the largest decode batch whose step stays within the TPOT target and
                      whose KV (prompt + output per sequence) fits the instance's blocks,
                      divided by that step's cost; 0 when even one sequence misses the target

Closed forms from the step-cost model, no simulation: the simulator (queueing, batching
dynamics) is what `plan` uses to rank configurations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.planner.profile import Profile
from router.autoscaler import PoolCapacity

DEFAULT_TPOT_S = 0.1


def prefill_tokens_per_s(profile: Profile, tp: int, prompt_tokens: float) -> float:
    cost = profile.at(tp).cost
    length = max(1.0, prompt_tokens)
    budget = profile.max_num_batched_tokens
    seqs = max(1.0, budget / length)
    tokens = seqs * length
    seconds = cost.step_seconds(int(tokens), int(round(seqs)), 0, 0, int(seqs * length * length))
    return tokens / seconds if seconds > 0 else 0.0


def max_decode_batch(profile: Profile, tp: int, prompt_tokens: float, output_tokens: float,
                     tpot_s: float) -> int:
    """Largest decode batch within the TPOT target and the KV cache (0: none)."""
    par = profile.at(tp)
    context = max(1.0, prompt_tokens) + max(1.0, output_tokens) / 2
    per_seq_blocks = -(-int(max(1.0, prompt_tokens) + max(1.0, output_tokens)) // profile.block_size)
    memory_cap = par.num_kv_blocks // max(1, per_seq_blocks)
    best = 0
    for batch in range(1, min(profile.max_num_seqs, memory_cap) + 1):
        if par.cost.decode_seconds(batch, context) <= tpot_s:
            best = batch
        else:
            break
    return best


def decode_tokens_per_s(profile: Profile, tp: int, prompt_tokens: float, output_tokens: float,
                        tpot_s: float) -> float:
    batch = max_decode_batch(profile, tp, prompt_tokens, output_tokens, tpot_s)
    if batch == 0:
        return 0.0
    context = max(1.0, prompt_tokens) + max(1.0, output_tokens) / 2
    return batch / profile.at(tp).cost.decode_seconds(batch, context)


@dataclass
class ProfileCapacity:
    """`router.autoscaler.CapacityModel` from a profile: per role its TP degree, one TPOT
    target; results cached by (role, rounded lengths)."""

    profile: Profile
    tpot_s: float = DEFAULT_TPOT_S
    tp: dict[str, int] = field(default_factory=dict)
    # Lengths used while nothing has arrived yet.
    default_prompt_tokens: float = 256.0
    default_output_tokens: float = 128.0
    _cache: dict = field(default_factory=dict)

    def capacity(self, role: str, mean_prompt_tokens: float, mean_output_tokens: float) -> PoolCapacity | None:
        prompt = mean_prompt_tokens if mean_prompt_tokens > 0 else self.default_prompt_tokens
        output = mean_output_tokens if mean_output_tokens > 0 else self.default_output_tokens
        tp = self.tp.get(role, 1)
        if tp not in self.profile.parallel:
            return None
        key = (role, tp, round(prompt, -1), round(output, -1))
        if key not in self._cache:
            self._cache[key] = PoolCapacity(
                prefill_tokens_per_s=prefill_tokens_per_s(self.profile, tp, prompt),
                decode_tokens_per_s=decode_tokens_per_s(self.profile, tp, prompt, output, self.tpot_s))
        return self._cache[key]


TABLE_PROMPTS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TABLE_OUTPUTS = (16, 64, 256, 1024)


def capacity_table(profile: Profile, tp: dict[str, int], tpot_s: float = DEFAULT_TPOT_S,
                   roles: tuple[str, ...] = ("colocated", "prefill", "decode")) -> tuple:
    """AutoscalerConfig.capacity_table rows for the lengths that fit the profile's model."""
    model = ProfileCapacity(profile, tpot_s, dict(tp))
    rows = []
    for role in roles:
        for prompt in TABLE_PROMPTS:
            for output in TABLE_OUTPUTS:
                if prompt + output > profile.max_model_len:
                    continue
                cap = model.capacity(role, prompt, output)
                if cap is not None:
                    rows.append((role, float(prompt), float(output), cap.prefill_tokens_per_s,
                                 cap.decode_tokens_per_s))
    return tuple(rows)
