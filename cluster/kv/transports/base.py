"""The KV transport interface: how a request's KV blocks move from a source engine to a
destination engine. The implementations live beside this module, one per module; the factory
that picks one by name is the package's `__init__`.

The destination drives a transfer (pull): it has allocated blocks for the request, asks the
source actor for the request's blocks, and writes them into its own cache. Either way the
source keeps the blocks allocated until it is told to release them.
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass

import numpy as np
import ray
import torch

from cluster.kv.layout import KVCacheView


class TransferError(RuntimeError):
    pass


@dataclass(frozen=True)
class SourceRef:
    """Where a request's KV lives: the source instance's id and its actor handle."""

    instance_id: str
    actor: object
    node_id: str | None = None


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    num_blocks: int
    num_bytes: int
    seconds: float


class KVTransport(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def fetch(self, source: SourceRef, transfer_id: str, cache: KVCacheView, block_ids: list[int],
              timeout_s: float) -> int:
        """Copies the source's blocks of `transfer_id` into `block_ids` of `cache`; returns bytes.
        Raises TransferError or TimeoutError."""


def ask_source(ref, transfer_id: str, cache: KVCacheView, timeout_s: float) -> dict:
    """Waits (with a deadline) for a source's export of `transfer_id` and checks that its
    blocks fit this engine's cache; Ray failures become TransferError/TimeoutError."""
    try:
        payload = ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise TimeoutError(f"KV of {transfer_id} not received within {timeout_s:.1f}s") from exc
    except ray.exceptions.RayError as exc:
        raise TransferError(f"KV source failed for {transfer_id}: {exc}") from exc
    if payload is None:
        raise TransferError(f"KV source holds no blocks for {transfer_id}")
    if payload["signature"] != cache.signature():
        raise TransferError(f"KV layout mismatch for {transfer_id}: the source engine's cache "
                            "differs from this engine's (model, dtype or block size)")
    return payload


def tensor_to_wire(t: torch.Tensor) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """A byte view numpy can carry for any dtype (numpy has no bfloat16)."""
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape)


def tensor_from_wire(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(data)
    return raw.view(getattr(torch, dtype)).reshape(shape)
