"""Incremental detokenization and stop strings, owned by the router.

Engines emit token ids only. Text is decoded here with a sliding window (so a multi-byte
character split across tokens is emitted once it is complete), and stop strings are matched on
the text, holding back just enough characters that a stop string straddling two deltas is
never streamed to the client.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context so the first output token decodes with correct spacing.
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids):
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids) -> str:
        """Text completed by `new_ids` (may be empty while a character is incomplete)."""
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            delta = full_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is pending at the end of the stream, incomplete characters included."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]


@dataclass
class StopMatch:
    text: str  # text to emit now
    stopped_on: str | None  # the stop string that matched, if any


class StopStringMatcher:
    """Streams text, holding back a possible stop-string prefix; stops at the first match."""

    def __init__(self, stop_strings):
        self._stops = tuple(s for s in stop_strings if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str, final: bool = False) -> StopMatch:
        self._pending += text
        if self._stops:
            hit = self._earliest_match()
            if hit is not None:
                pos, stop = hit
                out, self._pending = self._pending[:pos], ""
                return StopMatch(out, stop)
        if final or self._hold == 0:
            out, self._pending = self._pending, ""
        else:
            cut = max(0, len(self._pending) - self._hold)
            out, self._pending = self._pending[:cut], self._pending[cut:]
        return StopMatch(out, None)

    def _earliest_match(self):
        best = None
        for stop in self._stops:
            pos = self._pending.find(stop)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best
