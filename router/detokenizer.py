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


class StreamDetokenizer:
    """IncrementalDetokenizer's results from the `tokenizers` library's own incremental decoder
    (DecodeStream, in Rust): one step per token instead of two window decodes per delta, about
    8x less CPU per token. Same text (tests/unit/router/test_detokenizer.py compares the two);
    only for fast tokenizers (`make_detokenizer` chooses)."""

    def __init__(self, tokenizer, prompt_token_ids):
        from tokenizers.decoders import DecodeStream  # a dependency of transformers' fast tokenizers

        self._tokenizer = tokenizer
        self._backend = tokenizer._tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        # Tokens whose text was emitted last (left context for flush) and tokens not yet
        # turned into text (an incomplete character).
        self._context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._pending: list[int] = []
        step = self._stream.step
        for token_id in self._context:
            step(self._backend, token_id)

    def push(self, new_ids) -> str:
        """Text completed by `new_ids` (may be empty while a character is incomplete)."""
        step, backend, pending = self._stream.step, self._backend, self._pending
        out = []
        for token_id in new_ids:
            piece = step(backend, token_id)
            pending.append(token_id)
            if piece:
                out.append(piece)
                self._context = pending[-PROMPT_CONTEXT_TOKENS:]
                pending.clear()
        return "".join(out)

    def flush(self) -> str:
        """Whatever is pending at the end of the stream, incomplete characters included."""
        if not self._pending:
            return ""
        decode = self._tokenizer.decode
        prefix = decode(self._context, skip_special_tokens=True)
        full = decode(self._context + self._pending, skip_special_tokens=True)
        self._context, self._pending = self._context + self._pending, []
        return full[len(prefix):]


def make_detokenizer(tokenizer, prompt_token_ids):
    """The fastest detokenizer that gives IncrementalDetokenizer's text for this tokenizer."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and type(backend).__module__.startswith("tokenizers"):
        try:
            return StreamDetokenizer(tokenizer, prompt_token_ids)
        except ImportError:  # a tokenizers release without DecodeStream
            pass
    return IncrementalDetokenizer(tokenizer, prompt_token_ids)


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
