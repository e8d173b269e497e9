"""The vLLM 0.32 CPU workaround (cluster/engine/vllm_cpu_fix.py): our kernel keeps the
contract, and the bug it works around is still there (when it is gone, drop the fix)."""

import pytest

from cluster.engine import vllm_cpu_fix as fix


def test_nothing_the_fix_relies_on_moved():
    assert fix.cpu_fix_problems() == []



def test_fixed_expand_matches_the_kernel_contract():
    import torch

    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # 2, 0, 3, 1 tokens
    temps = torch.tensor([0.8, 0.5, 1.3, 0.0])
    out = torch.full((6,), -1.0)
    fix._expand_kernel_impl_fixed(out, temps, cu, 0, 1)
    assert out.tolist() == pytest.approx([0.8, 0.8, 1.3, 1.3, 1.3, 1.0])
    for dtype in (torch.int32, torch.int64):
        top_k = torch.tensor([5, 0, 7, 9], dtype=dtype)
        out = torch.full((6,), -1, dtype=dtype)
        fix._expand_kernel_impl_fixed(out, top_k, cu, 0, 4096)
        assert out.tolist() == [5, 5, 7, 7, 7, 9]
    empty = torch.empty(0)
    fix._expand_kernel_impl_fixed(empty, torch.empty(0), torch.empty(0, dtype=torch.int32), 0, 0)


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
    original = fix._original_cpu_expand_impl or cpu_tl._expand_kernel_impl  # patched or not
    cu = torch.tensor([2, 3])
    out = torch.full((3,), -1.0)
    original(out, torch.tensor([0.8, 0.5]), cu, 0, 0)
    assert out.tolist() == [-1.0, -1.0, -1.0]  # nothing written: the bug


def test_top_k_on_a_step_without_drafts_crashes_vllm_and_the_fix_passes_it_through():
    """The bug fix_top_k_without_drafts works around (vLLM's own function still crashes on
    zero rows; when this fails, vLLM fixed it: drop the fix), and the wrapper's contract."""
    import torch
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    empty, k = torch.empty(0, 16), torch.empty(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="numel"):
        apply_top_k_top_p(empty, k, None)
    fix.fix_top_k_without_drafts()
    fix.fix_top_k_without_drafts()  # idempotent
    assert rejection_sampler.apply_top_k_top_p(empty, k, None).shape == (0, 16)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = rejection_sampler.apply_top_k_top_p(logits.clone(), torch.tensor([2]), None)
    assert torch.isinf(out[0, [0, 3]]).all() and out[0, 1] == 3.0
