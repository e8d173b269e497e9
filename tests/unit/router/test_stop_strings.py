from router.detokenizer import StopStringMatcher


def stream(matcher, pieces):
    out, stopped = "", None
    for i, piece in enumerate(pieces):
        m = matcher.feed(piece, final=i == len(pieces) - 1)
        out += m.text
        if m.stopped_on:
            return out, m.stopped_on
    return out, stopped


def test_no_stops_passes_everything_through():
    assert stream(StopStringMatcher([]), ["ab", "cd"]) == ("abcd", None)


def test_stop_inside_one_piece():
    assert stream(StopStringMatcher(["\n\n"]), ["abc\n\ndef"]) == ("abc", "\n\n")


def test_stop_straddles_pieces_and_is_never_emitted():
    m = StopStringMatcher(["STOP"])
    first = m.feed("hello ST")
    assert first.text == "hello" and first.stopped_on is None  # "ST" held back
    second = m.feed("OP and more")
    assert second.text == " " and second.stopped_on == "STOP"


def test_held_back_text_released_at_end():
    assert stream(StopStringMatcher(["STOP"]), ["hello ST", "O"]) == ("hello STO", None)


def test_earliest_stop_wins():
    assert stream(StopStringMatcher(["b", "a"]), ["xxab"]) == ("xx", "a")
