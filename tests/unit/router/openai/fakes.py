"""A scripted front end and a tiny tokenizer for the HTTP API's unit tests (no router, no
engine: the API's own logic only)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from router.validation import Limits, ValidatedRequest

LIMITS = Limits(max_model_len=64, vocab_size=100, default_max_tokens=8, max_prompt_tokens=63)
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}assistant:{% endif %}"


@dataclass
class Chunk:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CharTokenizer:
    """One token per character (id = code point % 100), BOS = 0 when special tokens are added."""

    bos_token = "^"

    def __init__(self, chat_template: str | None = TEMPLATE):
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [ord(c) % 100 for c in text]

    def apply_chat_template(self, conversation, chat_template=None, tokenize=False, add_generation_prompt=True,
                            continue_final_message=False, **kwargs):
        import jinja2

        template = jinja2.Environment().from_string(chat_template or self.chat_template)
        return template.render(messages=conversation, bos_token=self.bos_token,
                               add_generation_prompt=add_generation_prompt, **kwargs)


class FakeBackend:
    """generate() streams one token per step as text "t<i> ", max_tokens steps, 5 ms apart.

    Knobs: `error` is raised before the first chunk (admission, no instance, ...);
    `fail_after` raises `error` after that many chunks; `gate` (an Event) holds the stream
    before its first chunk until set. Records every request and how each stream ended:
    "finished" (ran to its end), "closed" (closed or cancelled early)."""

    def __init__(self):
        self.requests: list[ValidatedRequest] = []
        self.ended: list[str] = []
        self.error = None
        self.fail_after: int | None = None
        self.gate: asyncio.Event | None = None
        self.step_s = 0.005

    async def generate(self, request: ValidatedRequest):
        self.requests.append(request)
        how = "closed"
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None and self.fail_after is None:
                raise self.error
            n = request.sampling.max_tokens
            for i in range(n):
                if self.fail_after is not None and i == self.fail_after:
                    raise self.error
                await asyncio.sleep(self.step_s)
                last = i == n - 1
                yield Chunk(f"req-{len(self.requests)}", [i], f"t{i} ", finished=last,
                            finish_reason="length" if last else None,
                            prompt_tokens=len(request.prompt_token_ids), completion_tokens=i + 1)
            how = "finished"
        finally:
            self.ended.append(how)
