"""PrefixTracker: which prompt prefixes this engine's KV cache holds, in the cluster's names
(cluster/kv/prefix_hash.py), and a journal of changes the global scheduler reads with each
snapshot to keep its prefix index (router/prefix_index.py) current.

It is fed vLLM's KV cache events (BlockStored, BlockRemoved, AllBlocksCleared; the adapter
installs the sink, cluster/engine/vllm_adapter.py) and duck-types them, so it stays pure and
unit-testable: BlockStored carries vLLM's hashes of the new blocks, its parent's hash and the
blocks' token ids, from which the cluster's chained name of each block follows; BlockRemoved
carries vLLM's hashes only, hence the map from vLLM's hash to ours.

The journal is bounded: a reader whose position fell out of it (or who never read, or a new
incarnation of the engine) gets the whole set instead of a delta. Thread-safety: `on_events`
runs on the engine's loop thread, `read` on actor threads; a lock guards both.
"""

from __future__ import annotations

import threading
from collections import deque

from cluster.kv.prefix_hash import ROOT, chain_hash

# Changes kept for readers that lag (at 10 snapshots a second, minutes of churn at any real rate).
JOURNAL_LIMIT = 65536


class PrefixTracker:
    def __init__(self, journal_limit: int = JOURNAL_LIMIT):
        self._lock = threading.Lock()
        self._ours: dict[object, int] = {}  # vLLM's block hash -> the cluster's name
        self._held: dict[int, int] = {}  # the cluster's name -> how many vLLM blocks carry it
        self._journal: deque[tuple[int, bool, int]] = deque()  # (seq, added, name)
        self._journal_limit = journal_limit
        self._seq = 0
        # Blocks whose parent vLLM never announced (must not happen; counted to show if it does).
        self.orphan_blocks = 0

    # ---- loop thread ----
    def on_events(self, events) -> None:
        with self._lock:
            for event in events:
                kind = type(event).__name__
                if kind == "BlockStored":
                    self._stored(event)
                elif kind == "BlockRemoved":
                    for vllm_hash in event.block_hashes:
                        self._removed(vllm_hash)
                elif kind == "AllBlocksCleared":
                    for vllm_hash in list(self._ours):
                        self._removed(vllm_hash)

    def _stored(self, event) -> None:
        if getattr(event, "group_idx", None) not in (None, 0):
            return  # one KV group carries every layer here; others would repeat the same names
        if event.parent_block_hash is None:
            parent = ROOT
        elif event.parent_block_hash in self._ours:
            parent = self._ours[event.parent_block_hash]
        else:
            self.orphan_blocks += len(event.block_hashes)
            return
        size = event.block_size
        for i, vllm_hash in enumerate(event.block_hashes):
            tokens = event.token_ids[i * size:(i + 1) * size]
            if len(tokens) < size:
                return  # a partial block is never a prefix-cache entry
            parent = chain_hash(parent, tokens)
            if vllm_hash in self._ours:
                continue
            self._ours[vllm_hash] = parent
            self._held[parent] = self._held.get(parent, 0) + 1
            if self._held[parent] == 1:
                self._log(True, parent)

    def _removed(self, vllm_hash) -> None:
        name = self._ours.pop(vllm_hash, None)
        if name is None:
            return
        left = self._held[name] - 1
        if left:
            self._held[name] = left
            return
        del self._held[name]
        self._log(False, name)

    def _log(self, added: bool, name: int) -> None:
        self._seq += 1
        self._journal.append((self._seq, added, name))
        if len(self._journal) > self._journal_limit:
            self._journal.popleft()

    # ---- any thread ----
    def read(self, since: int | None) -> dict:
        """What changed after position `since`: {"seq", "added", "removed"}; or, when `since`
        is None, ahead of this tracker, or older than the journal reaches, the whole set:
        {"seq", "full": [names]}."""
        with self._lock:
            oldest = self._journal[0][0] - 1 if self._journal else self._seq
            if since is None or since > self._seq or since < oldest:
                return {"seq": self._seq, "full": list(self._held)}
            last: dict[int, bool] = {}  # a name added and removed since: only its final state counts
            for seq, was_added, name in self._journal:
                if seq > since:
                    last[name] = was_added
            return {"seq": self._seq, "added": [n for n, a in last.items() if a],
                    "removed": [n for n, a in last.items() if not a]}

    @property
    def num_blocks(self) -> int:
        return len(self._held)
