"""GPT-2's tokenizer, built offline from the vocabulary file in ``assets/``.

tiktoken normally downloads its vocabularies; gptviz ships the GPT-2 file
(``assets/gpt2.tiktoken``, byte-for-byte tiktoken's ``r50k_base.tiktoken``) and checks
its sha256 before building the encoding, so nothing touches the network.

Policy for ``<|endoftext|>`` typed in user text: :func:`encode` turns it into the
special token 50256, as an explorer user expects (tiktoken's own ``encode`` refuses
it by default). Every other character is ordinary text.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
N_VOCAB = 50257
#: sha256 of r50k_base.tiktoken, the hash tiktoken itself checks.
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "gpt2.tiktoken"


class TokenizerFileError(RuntimeError):
    """The GPT-2 vocabulary file is missing or is not the expected file."""


def vocab_path() -> Path:
    """Where the vocabulary is read from (``GPTVIZ_TOKENIZER_FILE`` overrides)."""
    return Path(os.environ.get("GPTVIZ_TOKENIZER_FILE") or DEFAULT_PATH)


def load_encoding(path: str | os.PathLike) -> tiktoken.Encoding:
    """Build the GPT-2 encoding from a ``.tiktoken`` file, verifying its sha256."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerFileError(
            f"GPT-2 vocabulary file not found: {path}. It ships with gptviz in assets/gpt2.tiktoken "
            "(see README: 'The tokenizer file')."
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GPT2_TIKTOKEN_SHA256:
        raise TokenizerFileError(
            f"GPT-2 vocabulary file {path} is corrupt or not the GPT-2 vocabulary: "
            f"sha256 {digest}, expected {GPT2_TIKTOKEN_SHA256}"
        )
    ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_TIKTOKEN_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=N_VOCAB,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
    )


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50,257 ids), loaded once from ``assets/``."""
    return load_encoding(vocab_path())


def encode(text: str, enc: tiktoken.Encoding | None = None) -> list[int]:
    """Token ids of user text; a typed ``<|endoftext|>`` becomes token 50256."""
    enc = enc or get_encoding()
    return enc.encode(text, allowed_special={ENDOFTEXT})


@dataclass(frozen=True)
class TokenPiece:
    """One token as the UI shows it."""

    id: int
    bytes: bytes
    text: str  # honest display text: decoded UTF-8, or the raw bytes as <0xE2 0x80>
    partial: bool  # bytes alone are not valid UTF-8 (e.g. part of an emoji)
    special: bool  # <|endoftext|>

    @property
    def hex(self) -> str:
        return " ".join(f"{b:02X}" for b in self.bytes)


def token_piece(token_id: int, enc: tiktoken.Encoding | None = None) -> TokenPiece:
    """The display form of one token id. Raises ``ValueError`` for ids outside the vocabulary."""
    enc = enc or get_encoding()
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < enc.n_vocab:
        raise ValueError(f"token id {token_id!r} is outside the GPT-2 vocabulary (0 … {enc.n_vocab - 1})")
    raw = enc.decode_single_token_bytes(token_id)
    special = token_id == ENDOFTEXT_ID
    try:
        text, partial = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, partial = "<" + " ".join(f"0x{b:02X}" for b in raw) + ">", True
    return TokenPiece(token_id, raw, text, partial, special)


def token_pieces(ids: list[int], enc: tiktoken.Encoding | None = None) -> list[TokenPiece]:
    return [token_piece(i, enc) for i in ids]


def show_whitespace(text: str) -> str:
    """Make spaces, tabs and newlines visible: ``·``, ``→``, ``↵``."""
    return text.replace(" ", "·").replace("\t", "→").replace("\r", "␍").replace("\n", "↵")


#: Other control characters as their Unicode "control pictures" (NUL → ␀), after show_whitespace.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(0x20)} | {0x7F: 0x2421}


def display_text(p: TokenPiece) -> tuple[str, str]:
    """(text shown for a token, its kind: ``""``, ``"special"`` or ``"partial"``): whitespace and
    control characters made visible, partial UTF-8 shown as its bytes, ``<|endoftext|>`` as is."""
    if p.special:
        return p.text, "special"
    if p.partial:
        return p.text, "partial"
    return show_whitespace(p.text).translate(_CONTROL_PICTURES), ""


def piece_text(token_id: int, enc: tiktoken.Encoding | None = None) -> str:
    """The raw text of a token (:attr:`TokenPiece.text`); ``<id>`` for ids beyond GPT-2's
    vocabulary (a configuration with a larger vocab_size)."""
    enc = enc or get_encoding()
    return token_piece(token_id, enc).text if 0 <= token_id < enc.n_vocab else f"<{token_id}>"


def label(token_id: int, enc: tiktoken.Encoding | None = None, width: int = 12) -> str:
    """Short display text of a token for plot axes and tables (whitespace visible, cut at ``width``)."""
    enc = enc or get_encoding()
    if not 0 <= token_id < enc.n_vocab:
        return f"<{token_id}>"
    text, _ = display_text(token_piece(token_id, enc))
    return text if len(text) <= width else text[: width - 1] + "…"
