"""Coupled sampling of seeded requests (decode_worker/seeded_sampling.py) reproduces vLLM 0.32's
own CPU sampler token for token, and its emission rule does not depend on the drafts.

No engine: vLLM's Sampler runs on random logits with per-request generators, step after step,
and the module's per-position noise must pick the same tokens."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from decode_worker.seeded_sampling import (
    NoiseStreams,
    coupled_emit,
    coupling_unsupported,
    gumbel_argmax,
    process_logits,
)


@pytest.fixture(scope="module", autouse=True)
def vllm_kernels():
    from vllm.platforms import current_platform

    current_platform.import_kernels()


def vllm_sample(logits: torch.Tensor, params: list[SamplingParams], generators: dict[int, torch.Generator]):
    """What vLLM's Sampler does with these rows (no logits processors, no penalties)."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    n, v = logits.shape
    meta = SamplingMetadata(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
        all_greedy=False, all_random=True,
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
        top_k=torch.tensor([p.top_k if p.top_k > 0 else v for p in params], dtype=torch.int64),
        generators=generators, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(n), presence_penalties=torch.zeros(n),
        repetition_penalties=torch.ones(n), output_token_ids=[[] for _ in range(n)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors())
    return Sampler()(logits.clone(), meta).sampled_token_ids.view(-1).tolist()


def test_position_noise_reproduces_vllms_seeded_cpu_sampler_step_after_step():
    torch.manual_seed(0)
    params = [SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=1.0, top_p=0.9, seed=12),
              SamplingParams(temperature=0.6, top_k=20, seed=13), SamplingParams(temperature=1.3, top_k=50,
                                                                                top_p=0.8, seed=14)]
    generators = {i: torch.Generator().manual_seed(p.seed) for i, p in enumerate(params)}
    streams = NoiseStreams()
    for step in range(12):
        logits = torch.randn(len(params), 512) * 3
        want = vllm_sample(logits, params, generators)
        got = [int(gumbel_argmax(process_logits(logits[i:i + 1], p, step),
                                 streams.seeds(f"r{i}", p.seed, [step]))[0]) for i, p in enumerate(params)]
        assert got == want, f"step {step}"
        for i in range(len(params)):
            streams.emitted(f"r{i}", step + 1)


def test_seeds_are_per_position_whatever_the_order_of_requests_and_memory_is_bounded():
    a, b = NoiseStreams(), NoiseStreams()
    first = a.seeds("x", 7, range(0, 6))
    assert b.seeds("x", 7, [5, 2]) == [first[5], first[2]]
    a.emitted("x", 4)
    assert a.seeds("x", 7, [4, 5]) == first[4:6]
    with pytest.raises(ValueError):
        a.seeds("x", 7, [3])
    a.keep_only(set())
    assert len(a) == 0


def test_fused_and_native_gumbel_argmax_are_distributed_like_the_softmax():
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    for fused in (True, False):
        counts = torch.zeros(4)
        for s in range(4000):
            counts[int(gumbel_argmax(logits, [s], use_fused=fused)[0])] += 1
        assert torch.allclose(counts / counts.sum(), probs, atol=0.03), (fused, counts)


def test_process_logits_masks_stop_tokens_below_min_tokens_only():
    params = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[5], seed=1)
    params.update_from_generation_config({}, eos_token_id=2)
    out = process_logits(torch.zeros(4, 8), params, first_position=1)
    # Positions 1 and 2 are below min_tokens: eos (2) and the stop token (5) are impossible.
    assert torch.isinf(out[:2, [2, 5]]).all() and not torch.isinf(out[2:]).any()
    assert not torch.isinf(out[:2, [0, 1, 3, 4, 6, 7]]).any()


def test_emission_is_the_target_tokens_up_to_the_first_disagreement():
    assert coupled_emit([], [7]) == [7]
    assert coupled_emit([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert coupled_emit([1, 9, 3], [1, 2, 3, 4]) == [1, 2]
    assert coupled_emit([-1, -1], [5, 6, 7]) == [5]
    # Whatever was drafted, what is emitted is a prefix of the target's own tokens.
    for drafts in ([0, 0, 0], [1, 2, 0], [1, 2, 3]):
        emitted = coupled_emit(drafts, [1, 2, 3, 4])
        assert emitted == [1, 2, 3, 4][:len(emitted)]
    with pytest.raises(ValueError):
        coupled_emit([1], [1])


def test_unsupported_sampling_keeps_vllms_own_path():
    assert coupling_unsupported(SamplingParams(temperature=0.7, seed=3)) is None
    assert coupling_unsupported(SamplingParams(temperature=0.7, seed=3, top_k=5, top_p=0.9, min_tokens=2)) is None
    assert coupling_unsupported(SamplingParams(temperature=0.0, seed=3)) is not None
    assert coupling_unsupported(SamplingParams(temperature=0.7)) is not None
    assert coupling_unsupported(SamplingParams(temperature=0.7, seed=3, presence_penalty=0.5)) == "penalties"
    assert coupling_unsupported(SamplingParams(temperature=0.7, seed=3, logit_bias={1: 2.0})) == "logit_bias"
    assert coupling_unsupported(SamplingParams(temperature=0.7, seed=3, logprobs=2)) == "logprobs"
    assert coupling_unsupported(SamplingParams(temperature=0.7, seed=3, min_p=0.1)) == "min_p"
