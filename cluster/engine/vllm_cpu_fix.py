"""Workarounds for vLLM 0.32.0 bugs that break sampled speculative decoding, pinned to that
version. Every engine that speculates needs them (ours and the plain baselines), so they live
with the engine adapter, not with TETRIS:

- ``fix_cpu_expand_kernel``: on CPU, sampled verification reads uninitialised temperatures;
- ``fix_top_k_without_drafts``: a step in which no request verifies a draft crashes when any
  request of the batch uses top-k (any device).

`cpu_fix_problems()` names what moved when vLLM changes; tests/unit/decode_worker/test_spec_adapter.py
calls it through decode_worker.spec_adapter.check_vllm_internals().
"""

from __future__ import annotations

import hashlib
import inspect

import torch

from cluster.engine.vllm_pin import VllmInternalsError

# sha256 of inspect.getsource(vllm.utils.cpu_triton_utils._expand_kernel_impl) in vLLM 0.32.0:
# the CPU fallback of the rejection sampler's expand kernel, which drops float outputs (see
# fix_cpu_expand_kernel).  A new source means vLLM changed it: re-check whether the fix is
# still needed.
_CPU_EXPAND_SHA256 = "b0d7df291932f1c3d0818bcba211d3c9b2a701de070dc888ff659948763e9559"

_original_cpu_expand_impl = None  # vLLM's function, once fix_cpu_expand_kernel replaced it


def _expand_kernel_impl_fixed(output, input_val, cu_num_tokens, replace_from, replace_to,
                              MAX_NUM_TOKENS=None):
    """``output[cu[i-1]:cu[i]] = input[i]`` (``replace_from`` -> ``replace_to``), any dtype.

    Same signature as vLLM's ``cpu_triton_utils._expand_kernel_impl`` (so the kernel
    dispatcher binds it the same way), written in torch.
    """
    cu = cu_num_tokens.to(torch.int64)
    if cu.numel() == 0:
        return
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    vals = torch.where(input_val == replace_from,
                       torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    total = int(cu[-1])
    output[:total] = torch.repeat_interleave(vals, counts, output_size=total).to(output.dtype)


def fix_cpu_expand_kernel() -> bool:
    """Work around a vLLM 0.32.0 CPU bug that breaks sampled speculative decoding.

    Without Triton, vLLM routes the rejection sampler's ``expand_kernel`` to
    ``cpu_triton_utils._expand_kernel_impl``, which hands the C++ op
    ``output.to(torch.int64)`` (a *copy* when ``output`` is float) and never copies back.
    ``expand_batch_to_tokens`` uses it for the per-token temperature (and top-p), so those
    stay uninitialised memory (and the float inputs are truncated to int): the target
    probabilities of non-greedy requests become NaN/garbage, verification rejects
    arbitrarily and "recovered" tokens come out as token id 0.  Greedy requests are not
    affected.  This affects plain vLLM draft-model speculative decoding on CPU as well, so
    baseline engines need it too.

    Replaces the CPU fallback (future engines in this process) and the already-registered
    kernel override (engines built before).  Idempotent; a no-op where Triton runs the real
    kernel (GPUs).  Returns whether the fallback is in use.
    """
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON:
        return False
    from vllm.utils import cpu_triton_utils as cpu_tl
    from vllm.v1.sample import rejection_sampler

    current = cpu_tl._expand_kernel_impl
    if current is not _expand_kernel_impl_fixed:
        digest = hashlib.sha256(inspect.getsource(current).encode()).hexdigest()
        if digest != _CPU_EXPAND_SHA256:
            raise VllmInternalsError(
                "vllm.utils.cpu_triton_utils._expand_kernel_impl changed; review "
                "decode_worker.spec_adapter.fix_cpu_expand_kernel")
        global _original_cpu_expand_impl
        _original_cpu_expand_impl = current
        cpu_tl._expand_kernel_impl = _expand_kernel_impl_fixed
    # Engines already built hold a KernelOverride (vllm.triton_utils.dispatcher) whose
    # impl is the old function; the same wrapper object is referenced from every holder.
    wrapper = getattr(rejection_sampler, "expand_kernel", None)
    impl = getattr(wrapper, "_impl", None)
    if impl is not None and getattr(impl, "__module__", None) == cpu_tl.__name__ \
            and getattr(impl, "__name__", None) == "_expand_kernel_impl":
        wrapper._impl = wrapper.func = _expand_kernel_impl_fixed
    return True


_original_apply_top_k_top_p = None  # the rejection sampler's, once fix_top_k_without_drafts wrapped it


def _apply_top_k_top_p_any_rows(logits, k, p):
    """vLLM's ``apply_top_k_top_p``, except that zero rows come back untouched."""
    if logits.shape[0] == 0:
        return logits
    return _original_apply_top_k_top_p(logits, k, p)


def fix_top_k_without_drafts() -> None:
    """Work around a vLLM 0.32.0 crash of speculating engines.

    With speculative decoding on, vLLM's model runner always samples through the rejection
    sampler, also in steps where no request has a draft (every prefill step, and every step in
    which the policy verifies nothing).  Its ``apply_sampling_constraints`` then applies top-k
    to an empty ``[0, V]`` tensor, and ``apply_top_k_only`` calls ``k.max()`` on an empty
    tensor: ``RuntimeError: max(): Expected reduction dim to be specified for input.numel() ==
    0``, which kills the engine step as soon as one request of such a batch sets ``top_k``.
    Wraps the rejection sampler's ``apply_top_k_top_p`` so that zero rows pass through
    (nothing to constrain).  Idempotent.
    """
    from vllm.v1.sample import rejection_sampler

    global _original_apply_top_k_top_p
    current = rejection_sampler.apply_top_k_top_p
    if current is _apply_top_k_top_p_any_rows:
        return
    _original_apply_top_k_top_p = current
    rejection_sampler.apply_top_k_top_p = _apply_top_k_top_p_any_rows


def cpu_fix_problems() -> list[str]:
    """What moved in vLLM among the things fix_cpu_expand_kernel relies on (empty: nothing)."""
    problems: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    def src(obj) -> str:
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError) as e:  # only when vLLM moved
            problems.append(f"cannot read source of {obj!r}: {e}")
            return ""

    try:
        from vllm.utils import cpu_triton_utils as cpu_tl
        from vllm.v1.sample import rejection_sampler
    except ImportError as e:
        problems.append(f"vllm.utils.cpu_triton_utils / rejection_sampler moved: {e}")
    else:
        impl = getattr(cpu_tl, "_expand_kernel_impl", None)
        need(impl is _expand_kernel_impl_fixed or (
            impl is not None
            and hashlib.sha256(src(impl).encode()).hexdigest() == _CPU_EXPAND_SHA256),
            "vllm.utils.cpu_triton_utils._expand_kernel_impl changed (fix_cpu_expand_kernel "
            "replaces it: check whether vLLM fixed float outputs, then update or drop the fix)")
        need(hasattr(rejection_sampler, "expand_kernel")
             and "_expand(" in src(rejection_sampler.expand_batch_to_tokens),
             "rejection_sampler.expand_kernel / expand_batch_to_tokens calling _expand(...)")
        need(hasattr(rejection_sampler, "apply_top_k_top_p")
             and "return apply_top_k_top_p(logits, top_k, top_p)"
             in src(rejection_sampler.apply_sampling_constraints),
             "rejection_sampler.apply_sampling_constraints calling the module's apply_top_k_top_p "
             "(fix_top_k_without_drafts wraps it)")

    return problems
