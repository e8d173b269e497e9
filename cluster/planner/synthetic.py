"""Profiles synthesized from public numbers, for hardware this project cannot run on.

A roofline model of one transformer step, from a model's published shape and a GPU's
published peak compute and memory bandwidth, with stated efficiencies:

    weights read once per step (memory-bound)       W / (tp * BW * bw_eff)
    each token's linear layers (compute-bound)      2 * P / (tp * FLOPS * mfu)
    each decode sequence reads its KV (memory)      kv_bytes/token / (tp * BW * bw_eff)
    prefill attention over the prompt (compute)     2 * layers * hidden per (token x context)
                                                    / (tp * FLOPS * attn_mfu)
    tensor parallelism: two all-reduces of the hidden state per layer per token over the
    GPU interconnect (ring: 2(tp-1)/tp of the bytes) plus a fixed latency per all-reduce
    a fixed per-step overhead (scheduler, kernel launches, sampling)

These become a `StepCostModel` directly (no samples), so the simulator and the planner treat
them like a measured profile.

Sources of the inputs (public, quoted in each preset's `notes`):
* Llama-2-13B shape: 40 layers, hidden 5120, 40 heads (no GQA), FFN 13824, vocab 32000,
  13.0e9 parameters (Touvron et al., "Llama 2", 2023, Table 1 and the released config.json).
* A100-SXM4-80GB: 312 TFLOPS dense BF16, 2,039 GB/s HBM2e, NVLink 600 GB/s (NVIDIA A100
  datasheet). H100-SXM5-80GB: 989 TFLOPS dense BF16, 3,350 GB/s, NVLink 900 GB/s (NVIDIA H100
  datasheet). L4: 121 TFLOPS dense BF16, 300 GB/s, 24 GB, PCIe (NVIDIA L4 datasheet). A10G: 70
  TFLOPS dense BF16 (approx.), 600 GB/s, 24 GB, PCIe (AWS G5 documentation).
* Prices per GPU-hour are illustrative on-demand list prices (cloud price pages, 2024):
  H100 ~$6.98, A100-80GB ~$3.67, A10G ~$1.01, L4 ~$0.70. Plug in your own.

Assumptions (ours, not measured): 50% model-FLOPs utilization for the linear layers, 35% for
attention, 70% of peak memory bandwidth, 3 ms fixed overhead per step, 10 us latency per
all-reduce, 90% of GPU memory for weights + KV cache; vLLM 0.32's own scheduler defaults for
the token budget per step (2048 on A100/L4/A10G, 8192 on H100) and 256 sequences. With them a 13B decode step at batch 1
costs ~21 ms on one A100 (the published vLLM/DistServe measurements are in the 20-30 ms range)
and a 512-token prefill ~80 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.planner.profile import Contention, Overheads, ParallelProfile, Profile, StepCostModel


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    bytes_per_param: int = 2

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param


@dataclass(frozen=True)
class GpuSpec:
    name: str
    flops: float  # dense BF16 FLOP/s
    mem_bw: float  # bytes/s
    mem_bytes: float
    link_bw: float  # bytes/s between GPUs of one instance (all-reduce)
    price_per_hour: float
    # Between instances (KV transfer): bytes/s.
    network_bw: float = 25e9
    # vLLM 0.32's token budget per step for its OpenAI server on this GPU
    # (EngineArgs.get_batch_defaults: 8192 on >= 70 GiB GPUs other than A100, else 2048).
    max_num_batched_tokens: int = 2048


@dataclass(frozen=True)
class Efficiency:
    mfu: float = 0.5
    attn_mfu: float = 0.35
    bw_eff: float = 0.7
    step_overhead_s: float = 0.003
    allreduce_latency_s: float = 10e-6
    memory_fraction: float = 0.9


LLAMA2_13B = ModelShape("llama-2-13b", 13.0e9, 40, 5120, 40, 128)
GPUS = {
    "a100-80gb": GpuSpec("a100-80gb", 312e12, 2.039e12, 80e9, 300e9, 3.67, network_bw=25e9),
    "h100-80gb": GpuSpec("h100-80gb", 989e12, 3.35e12, 80e9, 450e9, 6.98, network_bw=50e9,
                         max_num_batched_tokens=8192),
    "l4": GpuSpec("l4", 121e12, 300e9, 24e9, 32e9, 0.70, network_bw=12.5e9),
    "a10g": GpuSpec("a10g", 70e12, 600e9, 24e9, 32e9, 1.01, network_bw=12.5e9),
}


def cost_model(model: ModelShape, gpu: GpuSpec, tp: int, eff: Efficiency = Efficiency()) -> StepCostModel:
    flops = tp * gpu.flops
    bw = tp * gpu.mem_bw * eff.bw_eff
    allreduce_bytes_per_token = 2 * model.layers * model.hidden * model.bytes_per_param
    ring = 2 * (tp - 1) / tp if tp > 1 else 0.0
    per_token_comm = ring * allreduce_bytes_per_token / gpu.link_bw
    per_step_comm = 2 * model.layers * eff.allreduce_latency_s if tp > 1 else 0.0
    per_token_compute = 2 * model.params / (flops * eff.mfu)
    return StepCostModel(
        const_s=eff.step_overhead_s + model.weight_bytes / bw + per_step_comm,
        per_prefill_token_s=per_token_compute + per_token_comm,
        per_prefill_attention_s=2 * model.layers * model.hidden / (flops * eff.attn_mfu),
        per_prefill_seq_s=0.0,
        per_decode_seq_s=per_token_compute + per_token_comm,
        per_context_token_s=model.kv_bytes_per_token / bw,
    )


def kv_blocks(model: ModelShape, gpu: GpuSpec, tp: int, block_size: int, eff: Efficiency = Efficiency()) -> int:
    free = tp * gpu.mem_bytes * eff.memory_fraction - model.weight_bytes
    if free <= 0:
        return 0
    return int(free // (model.kv_bytes_per_token * block_size))


def roofline_profile(model: ModelShape = LLAMA2_13B, gpu: GpuSpec = GPUS["a100-80gb"],
                     tp_degrees: tuple[int, ...] = (1, 2, 4), eff: Efficiency = Efficiency(),
                     block_size: int = 16, max_num_batched_tokens: int | None = None, max_num_seqs: int = 256,
                     max_model_len: int = 4096) -> Profile:
    """A profile of `model` on `gpu` at each TP degree the model fits in."""
    parallel = {}
    for tp in tp_degrees:
        blocks = kv_blocks(model, gpu, tp, block_size, eff)
        if blocks * block_size < max_model_len:
            continue  # the weights (plus one full-length sequence) do not fit
        parallel[tp] = ParallelProfile(tp, blocks, cost_model(model, gpu, tp, eff))
    if not parallel:
        raise ValueError(f"{model.name} does not fit on {gpu.name} at TP {tp_degrees}")
    return Profile(
        hardware={"kind": "gpu", "gpu": gpu.name, "source": "synthesized (roofline, public specs)",
                  "flops": gpu.flops, "mem_bw": gpu.mem_bw, "mem_bytes": gpu.mem_bytes, "link_bw": gpu.link_bw},
        model={"name": model.name, "params": model.params, "layers": model.layers, "hidden": model.hidden},
        vllm_version="n/a (synthesized)",
        block_size=block_size, max_num_batched_tokens=max_num_batched_tokens or gpu.max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len, kv_bytes_per_token=model.kv_bytes_per_token,
        kv_bandwidth_bytes_per_s=gpu.network_bw, kv_latency_s=0.001,
        parallel=parallel, contention=Contention(pair_slowdown=1.0),
        overheads=Overheads(dispatch_s=0.001, emit_s=0.001, handoff_s=0.002, startup_s=60.0),
        price_per_gpu_hour=gpu.price_per_hour, name=f"{model.name}@{gpu.name}",
        notes=(__doc__ or "").strip() + f"\n\nEfficiencies used: {eff}.",
    )


def preset(name: str) -> Profile:
    """`synthetic:MODEL@GPU` names, e.g. `llama-2-13b@a100-80gb`."""
    model_name, _, gpu_name = name.partition("@")
    if model_name != LLAMA2_13B.name or gpu_name not in GPUS:
        raise ValueError(f"unknown synthetic profile {name!r}: use {LLAMA2_13B.name}@GPU with GPU one of "
                         f"{', '.join(GPUS)}")
    return roofline_profile(LLAMA2_13B, GPUS[gpu_name])
