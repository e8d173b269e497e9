"""Breaks loudly when vLLM moves what decode_worker/spec_adapter.py (TETRIS) hooks into.

No engine is built here (the integration test does that); these checks read the installed
vLLM's classes, signatures and sources.
"""

import pytest
import vllm

from decode_worker import spec_adapter as sa


def test_pinned_version():
    assert sa.PINNED_VLLM_VERSION == "0.32.0"
    assert vllm.__version__ == sa.PINNED_VLLM_VERSION, (
        f"vLLM {vllm.__version__} installed; decode_worker/spec_adapter.py is written for "
        f"{sa.PINNED_VLLM_VERSION}")
    assert sa.check_vllm_version() == sa.PINNED_VLLM_VERSION


def test_vllm_internals_are_where_the_adapter_expects():
    sa.check_vllm_internals()  # raises VllmInternalsError naming everything that moved


def test_version_mismatch_fails_loudly(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(sa.VllmInternalsError, match="pinned to vLLM 0.32.0"):
        sa.check_vllm_version()
    with pytest.raises(sa.VllmInternalsError, match="0.33.0"):
        sa.check_vllm_internals()


def test_a_moved_seam_is_named(monkeypatch):
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def _get_spec_decode_draft_probs(self, metadata):  # renamed parameter, new body
        return None

    def _greedy_sample(self, hidden_states):
        return self.model.compute_logits(hidden_states).argmax(dim=-1)

    monkeypatch.setattr(GPUModelRunner, "_get_spec_decode_draft_probs", _get_spec_decode_draft_probs)
    monkeypatch.setattr(SpecDecodeBaseProposer, "_greedy_sample", _greedy_sample)
    with pytest.raises(sa.VllmInternalsError) as info:
        sa.check_vllm_internals()
    msg = str(info.value)
    assert "_get_spec_decode_draft_probs(self, spec_decode_metadata)" in msg
    assert "_draft_probs[row, :num_draft]" in msg
    assert "_greedy_sample source changed" in msg




def test_moved_smartspec_and_seeded_sampling_seams_are_named(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def _sample(self, logits, metadata):  # renamed parameter
        return None

    def forward_cpu(self, logits, generators, k, p):  # a sampler drawing its noise differently
        return logits.argmax(dim=-1), None

    def schedule(self, *args, **kwargs):  # no dynamic-speculation field any more
        return None

    monkeypatch.setattr(GPUModelRunner, "_sample", _sample)
    monkeypatch.setattr(TopKTopPSampler, "forward_cpu", forward_cpu)
    monkeypatch.setattr(Scheduler, "schedule", schedule)
    with pytest.raises(sa.VllmInternalsError) as info:
        sa.check_vllm_internals()
    msg = str(info.value)
    assert "GPUModelRunner._sample(self, logits, spec_decode_metadata)" in msg
    assert "TopKTopPSampler.forward_cpu" in msg
    assert "Scheduler.schedule: placeholder-draft padding" in msg
