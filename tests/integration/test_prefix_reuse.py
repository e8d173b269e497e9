"""Multi-turn conversations reuse their history (real Ray, real vLLM CPU engines, gRPC over
loopback): prefix caching on the prefill instances, the global scheduler's prefix index and
session affinity, through 1P+1D and 2P+1D.

Each conversation's turn t sends the whole history (turn t-1's prompt + its answer + a new user
message), greedy, with a session id. Every answer equals the plain vLLM engine's; from the second
turn on, the prefill instances compute at most the prompt minus the previous prompt's full blocks
(the rest comes from the prefix cache); a conversation stays on one prefill instance; and when
that instance dies, the next turn is recomputed on the other one with the same answer."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from cluster.client import AsyncClient, Client, status_to_dict
from tests.integration.support import ENGINE_ARGS, corpus_token_ids, reference_greedy, run_server, wait_idle

BLOCK = 32  # the smallest block vLLM's CPU attention takes (a multiple of 32)
ANSWER_TOKENS = 16
pytestmark = pytest.mark.timeout(900)
# What the death test continues: the 2P+1D conversations and their instances.
TWO_P: dict = {}


@pytest.fixture(scope="module")
def two_prefills(target_model):
    yield from run_server(["--prefill", "2", "--decode", "1", "--model", target_model, *ENGINE_ARGS,
                           "--block-size", str(BLOCK), "--no-migration"])


def prefill_computed(status: dict) -> int:
    return sum(int(i.get("prompt_tokens_computed", 0)) for i in status["instances"] if i["role"] == "prefill")


def instances(status: dict) -> dict:
    return {i["instance_id"]: i for i in status["instances"]}


class Conversation:
    """One chat: a first message, then user turns; the reference engine's answers decide the
    history, so a cluster that answers correctly sends exactly the reference's prompts."""

    def __init__(self, tokenizer, reference_llm, index: int, first_len: int, user_len: int):
        self.tokenizer, self.llm = tokenizer, reference_llm
        self.session_id = f"conv-{index}"
        self.index, self.user_len = index, user_len
        self.prompt = corpus_token_ids(tokenizer, first_len, offset=3000 + 977 * index)
        self.turn = 0
        self.previous_len = 0

    def expected(self) -> list[int]:
        return reference_greedy(self.llm, [self.prompt], [ANSWER_TOKENS], ignore_eos=True)[0]

    def advance(self, answer: list[int]) -> None:
        self.turn += 1
        self.previous_len = len(self.prompt)
        user = corpus_token_ids(self.tokenizer, self.user_len, offset=20000 + 977 * self.index + 331 * self.turn)
        self.prompt = self.prompt + answer + user


def ask(address: str, conv: Conversation):
    with Client(address, timeout=300) as client:
        return client.generate(conv.prompt, max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True,
                               session_id=conv.session_id)


def run_turns(address: str, conv: Conversation, turns: int, block: int) -> list[str]:
    """Turns one at a time: each equals the reference, and from a conversation's second turn on
    the prefills compute at most the prompt minus the previous prompt's full blocks (cached)."""
    served = []
    with Client(address, timeout=300) as client:
        for _ in range(turns):
            before = prefill_computed(wait_idle(client))
            want = conv.expected()
            got = ask(address, conv)
            assert got.token_ids == want, f"{conv.session_id} turn {conv.turn} diverged from the plain engine"
            grew = prefill_computed(wait_idle(client)) - before
            if conv.turn:
                reusable = block * (conv.previous_len // block)
                assert grew <= len(conv.prompt) - reusable, (conv.session_id, conv.turn, grew, len(conv.prompt))
                assert grew < len(conv.prompt)
            served.append(got.served_by[0])
            conv.advance(got.token_ids)
    return served


def test_1p1d_turns_reuse_the_history(disagg_client, reference_llm, tokenizer):
    block = disagg_client.model_info().block_size
    conv = Conversation(tokenizer, reference_llm, 0, first_len=block + 40, user_len=block // 2 + 8)
    served = run_turns(disagg_client.address, conv, turns=4, block=block)
    assert served == ["prefill-0"] * 4
    status = status_to_dict(disagg_client.cluster_status())
    cache = instances(status)["prefill-0"]["prefix_cache"]
    assert int(cache["hit_tokens_device"]) >= 3 * block and 0 < float(cache["hit_rate"]) < 1
    assert "prefix_cache" not in instances(status)["decode-0"] or \
        int(instances(status)["decode-0"]["prefix_cache"].get("query_tokens", 0)) == 0


def test_2p1d_conversations_stay_on_their_instance_and_reuse_it(two_prefills, reference_llm, tokenizer):
    address = two_prefills.address
    convs = [Conversation(tokenizer, reference_llm, 10 + i, first_len=70 + 9 * i, user_len=23) for i in range(4)]
    # First turns at once (the scheduler spreads new conversations by load), later turns one
    # conversation at a time (so the prefill's counter can be read per turn).
    expected = [c.expected() for c in convs]

    async def first_turns():
        client = AsyncClient(address, timeout=300)
        try:
            return await asyncio.gather(*[client.generate(c.prompt, max_tokens=ANSWER_TOKENS, temperature=0.0,
                                                          ignore_eos=True, session_id=c.session_id) for c in convs])
        finally:
            await client.close()

    firsts = asyncio.run(first_turns())
    homes = []
    for conv, got, want in zip(convs, firsts, expected, strict=True):
        assert got.token_ids == want
        homes.append(got.served_by[0])
        conv.advance(got.token_ids)
    assert set(homes) == {"prefill-0", "prefill-1"}, f"4 new conversations all went to one instance: {homes}"
    for conv, home in zip(convs, homes, strict=True):
        served = run_turns(address, conv, turns=3, block=BLOCK)
        assert served == [home] * 3, f"{conv.session_id} left its instance: {served}"
    with Client(address, timeout=60) as client:
        status = status_to_dict(client.cluster_status())
    decisions = status["routing"]["decisions"]
    assert int(decisions.get("prefill/session", 0)) >= 12 and status["routing"]["policy"] == "prefix"
    for iid in ("prefill-0", "prefill-1"):
        assert float(instances(status)[iid]["prefix_cache"]["hit_rate"]) > 0.3
    metrics = two_prefills.metrics_text()
    assert 'disagg_routing_decisions_total{reason="session",role="prefill"}' in metrics
    assert 'disagg_instance_prefix_cache_hit_tokens_total{instance="prefill-0",role="prefill",tier="device"}' in metrics
    TWO_P["convs"], TWO_P["homes"] = convs, homes


def test_owner_died_next_turn_recomputes_elsewhere_with_the_same_answer(two_prefills, reference_llm):
    convs, homes = TWO_P["convs"], TWO_P["homes"]
    address = two_prefills.address
    conv, home = convs[0], homes[0]
    other = "prefill-1" if home == "prefill-0" else "prefill-0"
    with Client(address, timeout=300) as client:
        status = wait_idle(client)
        pid = int(instances(status)[home]["pid"])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while instances(status_to_dict(client.cluster_status()))[home]["state"] == "ready":
            assert time.monotonic() < deadline, f"{home} still ready after its process was killed"
            time.sleep(0.1)
    want = conv.expected()
    got = ask(address, conv)
    assert got.token_ids == want, "the turn after the owner died diverged from the plain engine"
    assert got.served_by[0] == other
    # The conversation lives on the survivor now: its next turn stays there and reuses it.
    conv.advance(got.token_ids)
    served = run_turns(address, conv, turns=1, block=BLOCK)
    assert served == [other]
    with Client(address, timeout=300) as client:  # the replacement comes back before the server stops
        deadline = time.monotonic() + 240
        while instances(status_to_dict(client.cluster_status()))[home]["state"] != "ready":
            assert time.monotonic() < deadline, f"{home} was not replaced"
            time.sleep(0.5)
        wait_idle(client)
