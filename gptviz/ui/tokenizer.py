"""The Tokenizer view: text → coloured token chips with ids, and ids → text."""

from __future__ import annotations

from typing import Any, NamedTuple

import gradio as gr
import pandas as pd

from ..tokenizer import ENDOFTEXT_ID, display_text, encode, get_encoding, token_piece
from .components import csv_button, csv_file
from .html import chips_html
from .inputs import check_text, parse_ids
from .outputs import components
from .serving import AppContext

EXAMPLE = "Hello, I am learning how GPT-2 reads text 🦜\n\tCafé, 日本語, tabs and  spaces<|endoftext|>"
TABLE_COLUMNS = ["position", "id", "piece", "bytes", "note"]


class Tokenized(NamedTuple):
    tok_chips: str
    tok_stats: str
    tok_ids: str
    tok_table: pd.DataFrame
    tok_csv: str | None


class Decoded(NamedTuple):
    detok_out: str
    detok_chips: str


class TokenizerView:
    """Handlers (plain functions of plain values) and the tab that shows them."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.c: dict[str, Any] = {}

    def _table(self, ids: list[int], enc) -> pd.DataFrame:
        rows = []
        for k, token_id in enumerate(ids[: self.ctx.settings.max_chips]):
            p = token_piece(token_id, enc)
            kind = "special" if p.special else "partial UTF-8" if p.partial else ""
            rows.append(dict(position=k, id=token_id, piece=display_text(p)[0], bytes=p.hex, note=kind))
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)

    def tokenize(self, text: str) -> Tokenized:
        """Text → (chips HTML, summary, ids as text, table of position/id/piece/bytes).

        A typed ``<|endoftext|>`` becomes token 50256 (see :func:`gptviz.tokenizer.encode`)."""
        text = check_text(text, "text", self.ctx.settings)
        enc = get_encoding()
        ids = encode(text, enc)
        if not ids:
            return Tokenized('<div class="chips note">Type some text to see its tokens.</div>', "0 tokens", "",
                             self._table([], enc), None)
        n_special = ids.count(ENDOFTEXT_ID)
        summary = (f"**{len(ids):,} tokens** · {len(text):,} characters · "
                   f"**{len(text) / len(ids):.2f} characters per token**")
        if n_special:
            summary += f" · {n_special} × `<|endoftext|>` (id {ENDOFTEXT_ID})"
        chips = chips_html(ids, enc, limit=self.ctx.settings.max_chips)
        table = self._table(ids, enc)
        return Tokenized(chips, summary, ", ".join(map(str, ids)), table, csv_file(table, "tokens"))

    def detokenize(self, ids_text: str) -> Decoded:
        """Ids → (decoded text, chips HTML). Bytes that are not valid UTF-8 alone decode to �
        in the text; the chips show them as bytes."""
        ids = parse_ids(ids_text, self.ctx.settings)
        enc = get_encoding()
        return Decoded(enc.decode(ids), chips_html(ids, enc, limit=self.ctx.settings.max_chips))

    # --------------------------------------------------------------- layout and wiring
    def build(self) -> dict[str, Any]:
        first = self.tokenize(EXAMPLE)
        c = self.c
        with gr.Row():
            with gr.Column(scale=3):
                c["tok_in"] = gr.Textbox(EXAMPLE, lines=3, max_lines=8, label="Text", elem_id="tokenize-input",
                                         info="<|endoftext|> typed here becomes the special token 50256")
                c["tok_btn"] = gr.Button("Tokenize", variant="primary", elem_id="tokenize-btn")
            with gr.Column(scale=2):
                c["tok_stats"] = gr.Markdown(first.tok_stats, elem_id="token-stats")
                c["tok_ids"] = gr.Textbox(first.tok_ids, label="Token ids", lines=2, max_lines=4, interactive=False,
                                          elem_id="token-ids", buttons=["copy"])
        c["tok_chips"] = gr.HTML(first.tok_chips, elem_id="token-chips", padding=True)
        with gr.Row():
            with gr.Column(scale=3):
                c["tok_table"] = gr.Dataframe(first.tok_table, label="Tokens: id, piece (· space, ↵ newline), "
                                              "UTF-8 bytes", interactive=False, max_height=360, elem_id="token-table",
                                              column_widths=["13%", "11%", "27%", "26%", "23%"])
                c["tok_csv"] = csv_button("token-csv", first.tok_csv)
            with gr.Column(scale=2):
                c["detok_in"] = gr.Textbox("15496, 11, 314, 716", label="Ids → text", elem_id="detokenize-input",
                                           info="ids separated by commas or spaces")
                c["detok_btn"] = gr.Button("Decode", elem_id="detokenize-btn")
                c["detok_out"] = gr.Textbox(label="Decoded text", interactive=False, elem_id="detokenize-output")
                c["detok_chips"] = gr.HTML("", elem_id="detokenize-chips")
        return c

    def wire(self) -> None:
        c = self.c
        gr.on([c["tok_btn"].click, c["tok_in"].submit], self.tokenize, c["tok_in"], components(Tokenized, c),
              api_name="tokenize")
        gr.on([c["detok_btn"].click, c["detok_in"].submit], self.detokenize, c["detok_in"],
              components(Decoded, c), api_name="detokenize")
