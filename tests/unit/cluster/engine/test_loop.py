from cluster.engine.loop import coalesce
from cluster.protocol import TokenDelta


def test_one_delta_per_request_in_order():
    out = coalesce([TokenDelta("a", [1]), TokenDelta("b", [5]), TokenDelta("a", [2]),
                    TokenDelta("a", [3], True, "length")])
    assert [(d.request_id, d.token_ids, d.finished, d.finish_reason) for d in out] == [
        ("a", [1, 2, 3], True, "length"), ("b", [5], False, None)]


def test_does_not_mutate_inputs():
    first = TokenDelta("a", [1])
    coalesce([first, TokenDelta("a", [2])])
    assert first.token_ids == [1]
