import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptviz import tokenizer
from gptviz.tokenizer import ENDOFTEXT_ID, TokenizerFileError, encode, load_encoding, show_whitespace, token_piece, token_pieces


def test_real_gpt2_ids(enc):
    # Real GPT-2 tokenizes "Hello, I am" as these four ids (SPEC / the book).
    assert enc.encode("Hello, I am") == [15496, 11, 314, 716]
    assert enc.n_vocab == 50257
    assert enc.eot_token == ENDOFTEXT_ID


def test_builds_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    enc = load_encoding(tokenizer.DEFAULT_PATH)
    assert enc.decode(enc.encode(" world")) == " world"


def test_get_encoding_is_loaded_once():
    assert tokenizer.get_encoding() is tokenizer.get_encoding()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trips_any_unicode(text):
    enc = tokenizer.get_encoding()
    ids = encode(text, enc)
    assert all(0 <= i < enc.n_vocab for i in ids)
    assert enc.decode(ids) == text
    # Concatenated token bytes are the UTF-8 text, whatever the pieces look like alone.
    assert b"".join(p.bytes for p in token_pieces(ids, enc)) == text.encode("utf-8", "surrogatepass")


def test_typed_endoftext_becomes_the_special_token(enc):
    ids = encode("Hi<|endoftext|>there", enc)
    assert ENDOFTEXT_ID in ids
    assert enc.decode(ids) == "Hi<|endoftext|>there"
    piece = token_piece(ENDOFTEXT_ID, enc)
    assert piece.special and piece.text == "<|endoftext|>"


def test_partial_utf8_tokens_are_shown_as_bytes(enc):
    ids = encode("🦙", enc)  # a 4-byte emoji that GPT-2 splits
    pieces = token_pieces(ids, enc)
    assert len(pieces) > 1
    partial = [p for p in pieces if p.partial]
    assert partial, "an emoji split across tokens must have partial pieces"
    for p in partial:
        assert "\ufffd" not in p.text
        assert p.text.startswith("<0x")
        assert bytes(int(h, 16) for h in p.text[1:-1].replace("0x", "").split()) == p.bytes


@pytest.mark.parametrize("bad", [-1, 50257, 10**9, True, "3"])
def test_out_of_range_ids_are_refused(bad, enc):
    with pytest.raises(ValueError, match="outside the GPT-2 vocabulary"):
        token_piece(bad, enc)


def test_show_whitespace():
    assert show_whitespace(" a\tb\n") == "·a→b↵"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerFileError, match="not found"):
        load_encoding(tmp_path / "gpt2.tiktoken")


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    data = bytearray(tokenizer.DEFAULT_PATH.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(TokenizerFileError, match="sha256"):
        load_encoding(bad)
