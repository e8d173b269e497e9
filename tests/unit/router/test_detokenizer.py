import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from router.detokenizer import IncrementalDetokenizer, StreamDetokenizer, make_detokenizer

TEXT = "def héllo(wörld):\n    return 'naïve café ☕ 日本語'  # ok\n" * 20


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streamed_text_equals_full_decode(tokenizer, chunk):
    prompt = tokenizer.encode("x = ")
    ids = tokenizer.encode(TEXT[:200])
    detok = IncrementalDetokenizer(tokenizer, prompt)
    out = ""
    for i in range(0, len(ids), chunk):
        piece = detok.push(ids[i:i + chunk])
        assert "\ufffd" not in piece  # never emits half a character
        out += piece
    out += detok.flush()
    assert out == tokenizer.decode(ids)


def test_split_multibyte_character_waits_for_completion(tokenizer):
    # "☕" is three UTF-8 bytes: feed them as single-byte tokens.
    mapping = dict(zip(range(256), _byte_tokens(tokenizer), strict=True))
    pieces = [mapping[b] for b in "☕".encode()]
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push(pieces[:1]) == ""
    assert detok.push(pieces[1:2]) == ""
    assert detok.push(pieces[2:]) == "☕"


def test_flush_emits_incomplete_tail(tokenizer):
    mapping = dict(zip(range(256), _byte_tokens(tokenizer), strict=True))
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push([mapping["☕".encode()[0]]]) == ""
    assert detok.flush() == "\ufffd"


def _byte_tokens(tokenizer):
    """Token id of each single byte 0..255."""
    return [_single_byte_id(tokenizer, b) for b in range(256)]


def _single_byte_id(tokenizer, byte):
    # Byte-level BPE maps each byte to one printable unicode char; find its token.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char = dict(zip(bs, map(chr, cs), strict=True))[byte]
    return tokenizer.convert_tokens_to_ids(char)


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_detokenizer_gives_the_same_text(tokenizer, chunk):
    """The fast path (tokenizers' DecodeStream) streams the text the window decoder streams,
    split multi-byte characters and the final flush included."""
    assert isinstance(make_detokenizer(tokenizer, []), StreamDetokenizer)
    mapping = dict(zip(range(256), _byte_tokens(tokenizer), strict=True))
    prompt = tokenizer.encode("x = ")
    ids = tokenizer.encode(TEXT[:300]) + [mapping[b] for b in "☕".encode()[:2]]  # ends mid-character
    slow, fast = IncrementalDetokenizer(tokenizer, prompt), StreamDetokenizer(tokenizer, prompt)
    got_slow = got_fast = ""
    for i in range(0, len(ids), chunk):
        piece = fast.push(ids[i:i + chunk])
        assert "\ufffd" not in piece
        got_fast += piece
        got_slow += slow.push(ids[i:i + chunk])
    assert got_fast == got_slow
    assert fast.flush() == slow.flush() == "\ufffd"
    assert got_fast == tokenizer.decode(ids[:-2])


def test_make_detokenizer_falls_back_for_slow_tokenizers():
    class Plain:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(str, ids))

    assert isinstance(make_detokenizer(Plain(), [1]), IncrementalDetokenizer)
