"""The vLLM version this project is written against, and the error every adapter raises when
vLLM moved underneath it. One pin for every module that touches vLLM internals."""

from __future__ import annotations

# The one vLLM version every adapter module (this one, vllm_cpu_fix, decode_worker's
# spec_adapter and migration_adapter) is written against.
PINNED_VLLM_VERSION = "0.32.0"


class VllmInternalsError(RuntimeError):
    """vLLM no longer looks the way an adapter module was written against."""


def check_vllm_version() -> str:
    import vllm

    if vllm.__version__ != PINNED_VLLM_VERSION:
        raise VllmInternalsError(
            f"disagg-serve is pinned to vLLM {PINNED_VLLM_VERSION} (engine internals are read "
            f"directly), but vLLM {vllm.__version__} is installed"
        )
    return vllm.__version__
