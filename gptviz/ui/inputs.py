"""What a visitor typed, checked: every view's text, prompts, ids and indices go through here.

Each check returns clean values or raises a message for the visitor (``gr.Error``); none
lets an input slow down or break the app for anyone else.
"""

from __future__ import annotations

import re
from typing import Any

import gradio as gr

from ..settings import Settings
from ..tokenizer import encode, get_encoding
from .serving import error

__all__ = ["check_text", "prompt_ids", "parse_ids", "index"]

_SURROGATES = re.compile("[\ud800-\udfff]")
_ID_SEPARATORS = re.compile(r"[\s,;\[\]()]+")


def check_text(text: Any, what: str, settings: Settings) -> str:
    """Visitor text within ``settings.max_text_chars``; lone UTF-16 surrogates (not characters,
    but the API's JSON can carry them) become U+FFFD with a warning."""
    text = text if isinstance(text, str) else "" if text is None else str(text)
    limit = settings.max_text_chars
    if len(text) > limit:
        raise error(f"The {what} is {len(text):,} characters long; the limit is {limit:,}. Shorten it and try again.")
    text, n = _SURROGATES.subn("\ufffd", text)
    if n:
        gr.Warning(f"The {what} holds {n} unpaired UTF-16 surrogate{'s' if n > 1 else ''} (not Unicode characters); "
                   "each is read as U+FFFD �.")
    return text


def prompt_ids(prompt: Any, settings: Settings) -> list[int]:
    """The prompt's token ids: not empty, at most ``settings.max_prompt_tokens``."""
    prompt = check_text(prompt, "prompt", settings)
    if not prompt:
        raise error("The prompt is empty: type at least one character, e.g. “Hello, I am”.")
    ids = encode(prompt, get_encoding())
    if len(ids) > settings.max_prompt_tokens:
        raise error(f"The prompt is {len(ids):,} tokens long; the limit is {settings.max_prompt_tokens:,} tokens.")
    return ids


def parse_ids(text: Any, settings: Settings) -> list[int]:
    """``"15496, 11 314"`` (commas, spaces or a Python/JSON list) → ids; a message naming the bad item."""
    text = check_text(text, "list of ids", settings)
    items = [t for t in _ID_SEPARATORS.split(text) if t]
    if not items:
        raise error("Type token ids separated by commas or spaces, e.g. 15496, 11, 314, 716.")
    ids, n_vocab = [], get_encoding().n_vocab
    for k, item in enumerate(items):
        if not re.fullmatch(r"[+-]?[0-9]+", item):
            raise error(f"Item {k + 1} ({item[:20]!r}) is not a whole number: ids are integers 0 … {n_vocab - 1}.")
        value = int(item) if len(item) <= 12 else n_vocab  # int() refuses > 4,300 digits; any such is too large
        if not 0 <= value < n_vocab:
            raise error(f"Item {k + 1} ({item[:20]}{'…' if len(item) > 20 else ''}) is outside the GPT-2 "
                        f"vocabulary: ids run from 0 to {n_vocab - 1}.")
        ids.append(value)
    return ids


def index(value: Any, size: int) -> int:
    """A layer or head index from a UI control, clamped into ``0 … size-1``."""
    try:
        return min(max(int(value), 0), size - 1)
    except (TypeError, ValueError, OverflowError):
        return 0
