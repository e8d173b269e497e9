"""Seeded requests under speculation: tokens that depend on the seed, never on the batch.

vLLM 0.32.0 draws a speculating request's random numbers from several streams: the draft
token from the engine's *global* generator (``compute_probs_and_sample_next_token``: "TODO:
Consider seeds"), the acceptance test and the recovered token from the request's own
generator, one draw per *verified draft*.  So a seeded request's tokens depend on what else
is in the batch, and under TETRIS or SmartSpec (whose lengths depend on the batch) even its own
generator is consumed differently from run to run.

Here a seeded (temperature > 0) request's randomness is keyed by its **output position**
instead.  Output position ``t`` (the request's ``t``-th generated token on this engine) gets
the ``t``-th 31-bit seed ``s_t`` drawn from ``torch.Generator().manual_seed(seed)`` -- exactly
the seed vLLM's CPU sampler (``TopKTopPSampler.forward_cpu``) draws from the request's
generator for its ``t``-th token without speculation -- and both models sample position ``t``
by Gumbel-max with that noise (vLLM's ``fused_gumbel_argmax(logits, s_t)`` on CPU):

* the draft proposes ``x_t = gumbel_argmax(draft logits at t, s_t)``;
* the target's token at ``t`` is ``y_t = gumbel_argmax(target logits at t, s_t)``, with the
  request's processing (min_tokens, temperature, top-k, top-p) applied as vLLM's sampler does;
* verification accepts draft ``x_t`` iff ``x_t == y_t``; the step emits
  ``y_0 .. y_m`` where ``m`` is the first rejected position (or the bonus position).

Every emitted token is ``y_t``, the token vLLM's sampler gives the same request without
speculation (same noise, same logits): the output is lossless, independent of how many drafts
were verified, of the batch and of the server's history, and on CPU equal to the plain
engine's seeded output.  The price: a coupled draft is accepted with probability
``P(x_t == y_t)``, below rejection sampling's ``sum min(p, q)`` (Gumbel coupling is not the
maximal coupling), so seeded requests accept fewer drafts than unseeded ones (``status``
counts them: ``coupled_request_steps``; calibration learns their rate separately).

Supported per request: temperature, top_k, top_p, min_tokens (everything the gRPC API can
set).  A seeded request that also uses penalties, logit_bias, allowed tokens, bad words,
min_p, logprobs or structured output keeps vLLM's own sampling (``coupling_unsupported``
names why): lossless, but not reproducible under speculation.

Where vLLM's fused CPU op is missing (GPUs), Gumbel noise comes from a generator seeded with
``s_t``: reproducible and lossless, but not the plain GPU engine's tokens.

This module touches vLLM (its sampler op, ``apply_top_k_top_p``, ``SamplingParams``
fields), pinned to 0.32.0 with the rest of the hook (``spec_adapter.check_vllm_internals``).
"""

from __future__ import annotations

import torch

__all__ = [
    "NoiseStreams",
    "coupled_emit",
    "coupling_unsupported",
    "gumbel_argmax",
    "process_logits",
]

_SAMPLING_EPS = 1e-5  # vLLM's threshold between greedy and random sampling


def coupling_unsupported(params) -> str | None:
    """Why a request's sampling cannot be coupled (None: it can, or it is not seeded-random)."""
    if params is None or params.seed is None or params.temperature < _SAMPLING_EPS:
        return "not a seeded random request"
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        return "penalties"
    if params.logit_bias:
        return "logit_bias"
    if params.allowed_token_ids:
        return "allowed_token_ids"
    if params.bad_words:
        return "bad_words"
    if params.min_p:
        return "min_p"
    if params.logprobs is not None:
        return "logprobs"
    if getattr(params, "structured_outputs", None) is not None:
        return "structured output"
    if getattr(params, "logits_processors", None):
        return "logits processors"
    return None


class NoiseStreams:
    """Per request: the seed ``s_t`` of each output position ``t``, drawn lazily, in order,
    from the request's own generator; positions already emitted are dropped (bounded)."""

    def __init__(self):
        self._streams: dict[str, tuple[torch.Generator, int, list[int]]] = {}

    def seeds(self, req_id: str, seed: int, positions) -> list[int]:
        gen, base, draws = self._streams.get(req_id) or (torch.Generator(device="cpu").manual_seed(seed), 0, [])
        out = []
        for t in positions:
            if t < base:
                raise ValueError(f"request {req_id}: position {t} was already emitted (first kept {base})")
            while base + len(draws) <= t:
                draws.append(int(torch.randint(0, 2 ** 31, (1,), generator=gen, dtype=torch.long).item()))
            out.append(draws[t - base])
        self._streams[req_id] = (gen, base, draws)
        return out

    def emitted(self, req_id: str, num_emitted: int) -> None:
        """Positions below ``num_emitted`` will never be sampled again."""
        entry = self._streams.get(req_id)
        if entry is not None:
            gen, base, draws = entry
            drop = max(0, min(num_emitted - base, len(draws)))
            self._streams[req_id] = (gen, base + drop, draws[drop:])

    def keep_only(self, live) -> None:
        for req_id in [r for r in self._streams if r not in live]:
            del self._streams[req_id]

    def __len__(self) -> int:
        return len(self._streams)


def process_logits(logits: torch.Tensor, params, first_position: int) -> torch.Tensor:
    """``[R, V]`` float32 logits of one request at output positions ``first_position + r``,
    processed the way vLLM's sampler processes them before its random draw: min_tokens (stop
    tokens masked below it), temperature, top-k / top-p."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    out = logits.to(torch.float32).clone()
    rows = out.shape[0]
    if params.min_tokens:
        stop = [t for t in params.all_stop_token_ids if 0 <= t < out.shape[1]]
        masked = [r for r in range(rows) if first_position + r < params.min_tokens]
        if stop and masked:
            out[torch.tensor(masked)[:, None], torch.tensor(stop)[None, :]] = float("-inf")
    temperature = torch.full((rows, 1), params.temperature, dtype=torch.float32)
    out.div_(temperature)
    k = torch.full((rows,), params.top_k, dtype=torch.long) if params.top_k and params.top_k > 0 else None
    p = torch.full((rows,), params.top_p, dtype=torch.float32) if params.top_p < 1.0 else None
    if k is not None or p is not None:
        out = apply_top_k_top_p(out, k, p)
    return out


def _has_fused_op() -> bool:
    try:
        return hasattr(torch.ops._C, "fused_gumbel_argmax")
    except (AttributeError, RuntimeError):
        return False


def gumbel_argmax(processed: torch.Tensor, seeds: list[int], *, use_fused: bool | None = None) -> torch.Tensor:
    """``argmax(logits + Gumbel noise of seed)`` per row: vLLM's CPU random sampler."""
    if use_fused is None:
        use_fused = processed.device.type == "cpu" and _has_fused_op()
    seed_t = torch.tensor(seeds, dtype=torch.long)
    if use_fused:
        return torch.ops._C.fused_gumbel_argmax(processed.to(torch.float32).contiguous(), seed_t).view(-1)
    probs = processed.softmax(dim=-1, dtype=torch.float32)
    noise = torch.empty_like(probs)
    for r, s in enumerate(seeds):
        noise[r].exponential_(generator=torch.Generator(device=probs.device).manual_seed(int(s)))
    return probs.div_(noise).argmax(dim=-1).view(-1)


def coupled_emit(draft_tokens: list[int], target_tokens: list[int]) -> list[int]:
    """Tokens a step emits: ``target_tokens`` (one per verified position plus the bonus) up to
    and including the first position whose draft differs (all of them if none does)."""
    if len(target_tokens) != len(draft_tokens) + 1:
        raise ValueError(f"need one target token per draft plus the bonus, got {len(target_tokens)} "
                         f"for {len(draft_tokens)} drafts")
    for j, (d, y) in enumerate(zip(draft_tokens, target_tokens, strict=False)):
        if d != y:
            return list(target_tokens[: j + 1])
    return list(target_tokens)
