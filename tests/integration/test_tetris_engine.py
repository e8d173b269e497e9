"""TETRIS inside a real in-process vLLM engine with the demo draft/target pair.

(a) greedy outputs equal a plain engine without speculative decoding, token for token;
(b) seeded sampling with TETRIS is reproducible across two fresh engines (and the greedy
    requests riding in the sampled batch still equal the plain engine);
(c) the stats: verified <= capacity every step, K = k + e proposals per request-step, and
    TETRIS trims (verified < proposed) and reallocates (some request verifies more than k).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

from decode_worker.tetris import TetrisConfig

pytestmark = pytest.mark.integration

CONFIG = TetrisConfig(k=2, extra=2)  # propose 4, verify N * 2 per step
K = CONFIG.num_speculative_tokens
MAX_TOKENS = [32, 32, 24, 32, 9, 32, 32, 17]
PROMPT_LENGTHS = [1, 6, 23, 57, 140, 12, 300, 88]


@pytest.fixture(scope="module")
def prompts(demo_models) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_models / "target" / "tokenizer.json"))
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    out = []
    for i, n in enumerate(PROMPT_LENGTHS):
        ids = tok.encode(text[331 * i:331 * i + 8 * n + 800], add_special_tokens=False).ids
        assert len(ids) >= n
        out.append(ids[:n])
    return out


def tetris_engine(demo_models, config: TetrisConfig = CONFIG):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    from cluster.engine.vllm_adapter import speculative_config
    from decode_worker.spec_adapter import install_tetris

    args = EngineArgs(
        model=str(demo_models / "target"),
        speculative_config=speculative_config(str(demo_models / "draft"), config.num_speculative_tokens),
        max_model_len=1024, dtype="float32", enforce_eager=True,
        kv_cache_memory_bytes=256 << 20, seed=0, disable_log_stats=False)
    engine = LLMEngine.from_engine_args(args)
    return engine, install_tetris(engine, config)


def run(engine, prompts, params) -> list[list[int]]:
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"q{i}", {"prompt_token_ids": p}, sp)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[f"q{i}"] for i in range(len(prompts))]


# Engines built here stay referenced until the interpreter exits: in vLLM 0.32.0 in-process
# engines share process-global parallel state, and dropping one (shutdown or garbage
# collection) tears it down under the others, e.g. conftest's session-wide `reference_llm`
# ("pipeline model parallel group is not initialized").
_KEEP_ALIVE: list = []


def close(engine) -> None:
    assert not engine.has_unfinished_requests()
    _KEEP_ALIVE.append(engine)


def check_stats(stats, config: TetrisConfig) -> None:
    booked = [r for r in stats.history if r.verified is not None]
    assert booked, "no TETRIS decision was ever verified"
    for r in booked:
        assert r.proposed == K * r.num_requests, r
        assert r.planned <= r.capacity and r.verified <= r.planned, r
        if r.source != "window":
            assert r.capacity == config.k * r.num_requests, r
        assert 0 <= r.accepted <= r.verified, r
        assert len(r.lengths) == r.num_requests and all(0 <= n <= K for n in r.lengths), r
        # Confidence was found for every batch; plain window k only below min_batch_size.
        assert r.source != "window" or r.num_requests < config.min_batch_size, r
    assert stats.proposed == K * stats.request_steps
    assert stats.verified < stats.proposed  # TETRIS trimmed
    assert stats.accepted > 0
    assert 0.0 < stats.acceptance_rate <= 1.0
    assert stats.mean_accepted_per_request_step == stats.accepted / stats.verified_request_steps
    # vLLM's own spec-decode counters agree with ours.
    assert stats.vllm_stats_seen
    assert (stats.vllm_draft_tokens, stats.vllm_accepted_tokens) == (stats.verified, stats.accepted)
    # It reallocated: some request verified more than the window k in a TETRIS step.
    assert any(max(r.lengths) > config.k for r in booked if r.source != "window"), \
        [r.lengths for r in booked]


def test_greedy_equals_plain_engine_and_stats(demo_models, prompts, reference_llm):
    from vllm import SamplingParams

    from tests.integration.support import reference_greedy

    want = reference_greedy(reference_llm, prompts, MAX_TOKENS)
    engine, stats = tetris_engine(demo_models)
    try:
        got = run(engine, prompts, [SamplingParams(temperature=0.0, max_tokens=n)
                                    for n in MAX_TOKENS])
    finally:
        close(engine)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"prompt {i}: TETRIS {g} != plain {w}"
    check_stats(stats, CONFIG)
    assert {r.source for r in stats.history} >= {"greedy"}


def test_seeded_sampling_is_reproducible(demo_models, prompts, reference_llm):
    from vllm import SamplingParams

    from tests.integration.support import reference_greedy

    greedy = {2, 5}  # two greedy requests ride in the sampled batch
    params = [SamplingParams(temperature=0.0 if i in greedy else 0.8, seed=1000 + i,
                             max_tokens=n) for i, n in enumerate(MAX_TOKENS)]
    outputs, all_stats = [], []
    for _ in range(2):
        engine, stats = tetris_engine(demo_models)
        try:
            outputs.append(run(engine, prompts, params))
        finally:
            close(engine)
        all_stats.append(stats.snapshot())
        check_stats(stats, CONFIG)
        assert "probs" in {r.source for r in stats.history}
    assert outputs[0] == outputs[1]
    assert all_stats[0] == all_stats[1]
    want = reference_greedy(reference_llm, [prompts[i] for i in sorted(greedy)],
                            [MAX_TOKENS[i] for i in sorted(greedy)])
    assert [outputs[0][i] for i in sorted(greedy)] == want
