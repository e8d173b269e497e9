"""A hand-computable profile for the planner tests: every cost is a round number."""

from __future__ import annotations

from cluster.planner.profile import Contention, Overheads, ParallelProfile, Profile, StepCostModel


def simple_profile(const_s: float = 0.01, per_prompt_token_s: float = 0.001, per_decode_seq_s: float = 0.0,
                   num_blocks: int = 10_000, block_size: int = 16, max_num_seqs: int = 64,
                   max_num_batched_tokens: int = 4096, pair_slowdown: float = 1.0, overheads: Overheads | None = None,
                   kv_bandwidth: float = 1e9, kv_latency_s: float = 0.0, kv_bytes_per_token: float = 1000.0,
                   tp2: StepCostModel | None = None, price: float | None = None) -> Profile:
    cost = StepCostModel(const_s=const_s, per_prefill_token_s=per_prompt_token_s, per_decode_seq_s=per_decode_seq_s)
    parallel = {1: ParallelProfile(1, num_blocks, cost)}
    if tp2 is not None:
        parallel[2] = ParallelProfile(2, num_blocks * 2, tp2)
    return Profile(
        hardware={"kind": "test"}, model={"name": "test"}, vllm_version="test", block_size=block_size,
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, max_model_len=100_000,
        kv_bytes_per_token=kv_bytes_per_token, kv_bandwidth_bytes_per_s=kv_bandwidth, kv_latency_s=kv_latency_s,
        parallel=parallel, contention=Contention(pair_slowdown=pair_slowdown),
        overheads=overheads or Overheads(dispatch_s=0.0, emit_s=0.0, handoff_s=0.0, startup_s=1.0),
        price_per_gpu_hour=price, name="simple")
