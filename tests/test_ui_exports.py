"""Tables as CSV: what the download holds is what the view shows."""

from __future__ import annotations

import gradio as gr
import pandas as pd
import pytest

from gptviz.ui.generate import GenerateView
from gptviz.ui.parameters import ParametersView
from gptviz.ui.tokenizer import TokenizerView

from .conftest import visit


def test_candidates_csv_is_the_viewed_steps_candidates(make_ctx):
    view = GenerateView(make_ctx())
    with pytest.raises(gr.Error, match="Press Step"):
        view.candidates_csv(0, visit("a"))
    for _ in range(3):
        view.step("Hello, I am", 0, 0, request=visit("a"))
    session = view.ctx.visitor(visit("a")).session
    for k in (2, 3):
        table = pd.read_csv(view.candidates_csv(k, visit("a")))
        record = session.steps[k - 1]
        assert table["id"].tolist() == [c.token_id for c in record.candidates]
        assert table["probability"].tolist() == pytest.approx([c.prob for c in record.candidates], rel=1e-9)
        assert table.loc[table["chosen"], "id"].tolist() == [record.token_id]


def test_token_and_parameter_csvs_hold_the_shown_tables(make_ctx):
    out = TokenizerView(make_ctx()).tokenize("Hello, I am")
    assert pd.read_csv(out.tok_csv)["id"].tolist() == out.tok_table["id"].tolist() == [15496, 11, 314, 716]
    counted = ParametersView(make_ctx()).params(50257, 1024, 768, 12, 12, 0.1, False, False)
    breakdown = pd.read_csv(counted.p_csv, dtype=str, keep_default_na=False)
    assert breakdown["total"].tolist() == counted.p_table["total"].tolist()
    assert "163,009,536" in breakdown["total"].tolist()
