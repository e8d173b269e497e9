"""Prefix block hashes: the names under which the cluster tracks which engine holds which prompt
prefix in its KV cache (prefix-aware routing, router/prefix_index.py).

A full block of `block_size` tokens is named by a chained hash: the hash of its parent block's
name and its own token ids, so one name stands for the whole prefix that ends with that block
(equal names mean equal prefixes, as in vLLM's own prefix cache). A partial last block has no
name: engines cache full blocks only.

These are not vLLM's block hashes: vLLM seeds its hash with a per-process random value unless
PYTHONHASHSEED is set, and reproducing it would pull vLLM into the front end. Front ends name a
prompt's blocks with `block_hashes`; engines translate vLLM's KV cache events (which carry each
stored block's token ids) into the same names (cluster/engine/prefix_tracker.py). Stable across
processes and machines (BLAKE2b, fixed byte order); pure, no I/O.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# The parent of a prompt's first block.
ROOT = 0


def chain_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The name of a block holding `token_ids` whose prefix is named `parent` (63-bit, so it
    fits every wire format here as a signed 64-bit integer)."""
    digest = hashlib.blake2b(struct.pack(f"<q{len(token_ids)}I", parent, *token_ids), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def block_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """Names of the full blocks of `token_ids`, first block first (at most `limit` of them)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    count = len(token_ids) // block_size
    if limit is not None:
        count = min(count, limit)
    names, parent = [], ROOT
    for i in range(count):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        names.append(parent)
    return names
