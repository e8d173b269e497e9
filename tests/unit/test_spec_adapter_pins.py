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


def test_draft_model_speculative_config_shape():
    from decode_worker.tetris import TetrisConfig

    cfg = sa.speculative_config("/models/draft", TetrisConfig(k=3, extra=2))
    assert cfg == {"method": "draft_model", "model": "/models/draft",
                   "num_speculative_tokens": 5, "draft_sample_method": "probabilistic"}
    # vLLM still accepts these keys.
    from vllm.config import SpeculativeConfig

    fields = set(SpeculativeConfig.__dataclass_fields__)
    assert {"method", "model", "num_speculative_tokens", "draft_sample_method"} <= fields


# --------------------------------------------------------------------------- the CPU fix


def test_fixed_expand_matches_the_kernel_contract():
    import torch

    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # 2, 0, 3, 1 tokens
    temps = torch.tensor([0.8, 0.5, 1.3, 0.0])
    out = torch.full((6,), -1.0)
    sa._expand_kernel_impl_fixed(out, temps, cu, 0, 1)
    assert out.tolist() == pytest.approx([0.8, 0.8, 1.3, 1.3, 1.3, 1.0])
    for dtype in (torch.int32, torch.int64):
        top_k = torch.tensor([5, 0, 7, 9], dtype=dtype)
        out = torch.full((6,), -1, dtype=dtype)
        sa._expand_kernel_impl_fixed(out, top_k, cu, 0, 4096)
        assert out.tolist() == [5, 5, 7, 7, 7, 9]
    empty = torch.empty(0)
    sa._expand_kernel_impl_fixed(empty, torch.empty(0), torch.empty(0, dtype=torch.int32), 0, 0)


def test_vllm_cpu_expand_still_drops_float_outputs():
    """The bug fix_cpu_expand_kernel works around; when this fails, vLLM fixed it: drop
    the fix (and this test)."""
    import torch
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON
    from vllm.utils import cpu_triton_utils as cpu_tl

    if HAS_TRITON or not current_platform.is_cpu():
        pytest.skip("the CPU fallback kernels are only used without Triton")
    current_platform.import_kernels()
    original = sa._original_cpu_expand_impl or cpu_tl._expand_kernel_impl  # patched or not
    cu = torch.tensor([2, 3])
    out = torch.full((3,), -1.0)
    original(out, torch.tensor([0.8, 0.5]), cu, 0, 0)
    assert out.tolist() == [-1.0, -1.0, -1.0]  # nothing written: the bug
