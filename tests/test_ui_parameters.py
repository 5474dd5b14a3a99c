"""The Parameters view's handlers, called directly: any configuration's count, and the presets."""

from __future__ import annotations

import gradio as gr
import pytest

from gptviz.config import CONFIG_FIELDS
from gptviz.settings import Settings
from gptviz.ui.outputs import skip
from gptviz.ui.parameters import CUSTOM, Counted, ParametersView, Preset
from gptviz.ui.serving import AppContext

SEED_FIELDS = (50257, 1024, 768, 12, 12, 0.1, False, False)


@pytest.fixture(scope="module")
def view() -> ParametersView:
    return ParametersView(AppContext(Settings(device="cpu")))  # closed-form counts: no model


def is_skip(x) -> bool:
    return x == gr.skip()


def test_params_for_the_source_config(view):
    out = view.params(*SEED_FIELDS)
    assert isinstance(out, Counted)
    assert "163,009,536 parameters" in out.p_total and out.preset_dd == "seed-124M"
    assert "the source's GPT_CONFIG_124M" in out.p_total
    assert "38,597,376" in out.p_table.to_string() and "85,026,816" in out.p_table.to_string()
    assert "163,009,536" in out.p_chart.layout.title.text
    assert out.p_memory.columns.tolist() == ["quantity", "value", "formula"]
    out = view.params(50257, 1024, 768, 12, 12, 0.1, False, True)
    assert "124,412,160 parameters" in out.p_total and out.preset_dd == CUSTOM
    assert "248,036,352" in view.params(50257, 1024, 768, 12, 24, 0.1, False, False).p_total  # + 12 × 7,085,568


def test_params_handles_gpt3_sized_and_ui_number_formats(view):
    v, t, d, n = 50257, 2048, 12288, 96
    block = 3 * (d * d + d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d  # att, ff, 2 norms
    expected = v * d + t * d + n * block + 2 * d  # tied head: no extra parameters
    out = view.params(50257.0, t, d, 96, 96.0, 0, True, True)  # number boxes may send floats
    assert f"{expected:,} parameters" in out.p_total and out.preset_dd == CUSTOM


@pytest.mark.parametrize(
    "fields, name",
    [((50257, 1024, 768, 5, 12, 0.1, False, False), "n_heads"),
     ((50257, 1024, 768, 12, 0, 0.1, False, False), "n_layers"),
     ((50257, None, 768, 12, 12, 0.1, False, False), "context_length"),
     ((50257, 1024, 768.5, 12, 12, 0.1, False, False), "emb_dim"),
     ((50257, 1024, 768, 12, 12, 1.5, False, False), "drop_rate")],
)
def test_invalid_params_warn_with_the_field_and_keep_the_last_result(view, fields, name):
    with pytest.warns(UserWarning, match=name):
        out = view.params(*fields)
    assert out == skip(Counted) and len(out) == len(Counted._fields) and all(is_skip(x) for x in out)


def test_preset_fills_the_fields(view):
    out = view.preset("gpt2")
    assert isinstance(out, Preset)
    assert tuple(getattr(out, f"cfg_{f}") for f in CONFIG_FIELDS) == (50257, 1024, 768, 12, 12, 0.1, True, True)
    assert "124,439,808 parameters" in out.p_total and out.preset_dd == "gpt2"
    assert out.p_total == view.params(*(getattr(out, f"cfg_{f}") for f in CONFIG_FIELDS)).p_total  # the same count
    custom = view.preset(CUSTOM)
    assert all(is_skip(x) for x in custom) and len(custom) == len(CONFIG_FIELDS) + len(Counted._fields)
    with pytest.raises(gr.Error, match="Unknown preset"):
        view.preset("gpt5")
