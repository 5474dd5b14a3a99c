"""The Tokenizer view's handlers, called directly (no browser): text → chips, ids → text."""

from __future__ import annotations

import re

import gradio as gr
import pytest

from gptviz.settings import Settings
from gptviz.ui.serving import AppContext
from gptviz.ui.tokenizer import TokenizerView

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]  # what GPT-2's tokenizer gives
LIMITS = Settings(device="cpu")


@pytest.fixture(scope="module")
def view() -> TokenizerView:
    return TokenizerView(AppContext(LIMITS))  # the tokenizer needs no model


def n_chips(html: str) -> int:
    return len(re.findall(r'class="chip[ "]', html))


def test_tokenize_hello(view):
    out = view.tokenize(PROMPT)
    assert out.tok_ids == "15496, 11, 314, 716"
    assert n_chips(out.tok_chips) == 4 and ">15496<" in out.tok_chips
    assert "4 tokens" in out.tok_stats and "2.75 characters per token" in out.tok_stats  # 11 characters / 4 tokens
    assert out.tok_table["id"].tolist() == HELLO_IDS
    assert out.tok_table["piece"].tolist() == ["Hello", ",", "·I", "·am"]  # spaces made visible
    assert out.tok_table["bytes"].tolist()[1] == "2C"


def test_tokenize_shows_endoftext_and_partial_utf8(view):
    out = view.tokenize("Hi<|endoftext|>🦜")
    assert "50256" in out.tok_ids.split(", ")
    assert 'class="chip special"' in out.tok_chips and "&lt;|endoftext|&gt;" in out.tok_chips
    assert "1 × `<|endoftext|>`" in out.tok_stats
    assert 'class="chip partial"' in out.tok_chips and "&lt;0xF0 0x9F&gt;" in out.tok_chips  # the parrot's bytes
    assert (out.tok_table["note"] == "partial UTF-8").sum() >= 2


def test_tokenize_makes_whitespace_and_control_characters_visible(view):
    out = view.tokenize("a\tb\nc\x00")
    pieces = out.tok_table["piece"].tolist()
    assert "→" in pieces and "↵" in pieces and "␀" in pieces  # tab, newline, NUL
    assert "\x00" not in out.tok_chips and "<br>" in out.tok_chips  # a newline token also breaks the line of chips


def test_tokenize_escapes_html_and_template_syntax(view):
    chips = view.tokenize("<script>alert(1)</script> {{value}} ${value}").tok_chips
    assert "<script>" not in chips and "{{" not in chips and "${" not in chips
    assert "&lt;" in chips and "&#123;" in chips


def test_tokenize_limits_and_empty_text(view):
    assert LIMITS.max_text_chars == 20_000
    with pytest.raises(gr.Error, match="20,000"):
        view.tokenize("a" * (LIMITS.max_text_chars + 1))
    view.tokenize("a" * LIMITS.max_text_chars)  # at the limit: read
    out = view.tokenize("")
    assert out.tok_stats == "0 tokens" and out.tok_ids == "" and len(out.tok_table) == 0


def test_tokenize_draws_at_most_max_chips(view):
    limit = LIMITS.max_chips
    out = view.tokenize(" a" * 3000)  # 3,000 tokens
    assert n_chips(out.tok_chips) == limit and f"{3000 - limit:,} more tokens" in out.tok_chips
    assert len(out.tok_table) == limit
    assert "3,000 tokens" in out.tok_stats and len(out.tok_ids.split(", ")) == 3000


def test_the_limits_are_the_contexts_settings():
    view = TokenizerView(AppContext(Settings(device="cpu", max_text_chars=10, max_chips=3)))
    out = view.tokenize(" a" * 5)
    assert n_chips(out.tok_chips) == 3 and "2 more tokens" in out.tok_chips and len(out.tok_table) == 3
    with pytest.raises(gr.Error, match="11 characters long; the limit is 10"):
        view.tokenize("a" * 11)
    with pytest.raises(gr.Error, match="list of ids is 11 characters long; the limit is 10"):
        view.detokenize("1, 2, 3, 45")
    assert view.detokenize("1, 2, 3, 4").detok_out == "\"#$%"  # 10 characters: read


def test_detokenize_round_trip_and_partial_bytes(view):
    out = view.detokenize("15496, 11, 314, 716")
    assert out.detok_out == PROMPT and n_chips(out.detok_chips) == 4
    out = view.detokenize("[8582 99]")  # the first two of the parrot's three tokens
    assert out.detok_out.endswith("\ufffd") and 'class="chip partial"' in out.detok_chips


@pytest.mark.parametrize(
    "bad, message",
    [("15496, abc", r"Item 2 \('abc'\) is not a whole number"), ("50257", "outside the GPT-2 vocabulary"),
     ("-1", "outside"), ("1.5", "not a whole number"), ("  ,, ", "Type token ids")],
)
def test_detokenize_refuses_bad_ids(view, bad, message):
    with pytest.raises(gr.Error, match=message):
        view.detokenize(bad)
