import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from router.detokenizer import IncrementalDetokenizer

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
