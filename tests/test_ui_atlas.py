"""The head-role atlas's handlers, called directly (no browser): the figure against head_roles
measured independently, the role switch, a clicked cell moving the Generate view, bad clicks,
role_note, and the page's launch arguments carrying the click bridge."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

from gptviz.analysis.heads import ROLES, cached_head_roles, head_roles, strongest_role
from gptviz.plots.heads import ROLE_LABELS
from gptviz.tokenizer import get_encoding
from gptviz.ui import LAUNCH_KWARGS
from gptviz.ui.atlas import ATLAS_JS, Atlas, AtlasView, Jump, _top_line, known_head_roles, role_note, verdict_probe_ids
from gptviz.ui.generate import GenerateView

from .conftest import seeded, visit

PROMPT = "Hello, I am"


@pytest.fixture
def view(ctx) -> GenerateView:
    return GenerateView(ctx)


@pytest.fixture
def atlas(ctx, view) -> AtlasView:
    return AtlasView(ctx, view)


@pytest.fixture
def a():
    return visit("a")


def is_skip(x) -> bool:
    return x == gr.skip()


def z_of(fig) -> np.ndarray:
    return np.array(fig.data[0].z, dtype=float)


def test_atlas_shows_every_heads_score_of_the_role(ctx, atlas, a, tiny_cfg):
    out = atlas.head_roles("previous_token", a)
    assert isinstance(out, Atlas)
    expected = head_roles(seeded(tiny_cfg))  # measured here, on an identical model built independently
    z = z_of(out.atlas)
    assert z.shape == (tiny_cfg.n_layers, tiny_cfg.n_heads)
    for row in expected.itertuples():
        assert z[row.layer, row.head] == pytest.approx(row.previous_token, abs=1e-4)
    cd = np.array(out.atlas.data[0].customdata, dtype=float)
    assert cd[1, 2, :2].tolist() == [1, 2]  # a click maps back to (layer, head)
    hover = out.atlas.data[0].hovertemplate
    assert all(ROLE_LABELS[r] in hover for r in ROLES)  # hover shows every score
    assert "Strongest previous token heads" in out.atlas_top and ctx.visitor(a).spec.label in out.atlas_top


def test_role_switch_changes_the_scores(atlas, a, tiny_cfg):
    expected = head_roles(seeded(tiny_cfg))
    first = z_of(atlas.head_roles("first_token", a).atlas)
    induction = z_of(atlas.head_roles("induction", a).atlas)
    assert not np.allclose(first, induction)
    for role, z in (("first_token", first), ("induction", induction)):
        want = expected.pivot(index="layer", columns="head", values=role).to_numpy()
        np.testing.assert_allclose(z, want, atol=1e-4)


def test_the_verdict_probe_measures_on_text(ctx, atlas, a, tiny_cfg):
    out = atlas.head_roles("previous_token", a, "verdict")
    text = verdict_probe_ids()
    assert len(text) == 256 and get_encoding().decode(list(text)).startswith("I HAD always thought Jack Gisburn")
    expected = head_roles(seeded(tiny_cfg), text_ids=text)  # measured here, on an identical model
    z = z_of(out.atlas)
    for row in expected.itertuples():
        assert z[row.layer, row.head] == pytest.approx(row.previous_token, abs=1e-4)
    assert "The Verdict" in out.atlas.layout.title.text and "on The Verdict, repeated" in out.atlas_top
    assert not np.allclose(z, z_of(atlas.head_roles("previous_token", a).atlas))  # random tokens: another table
    with pytest.raises(gr.Error, match="Unknown probe 'wiki'"):
        atlas.head_roles("previous_token", a, "wiki")


def test_the_line_under_the_atlas_says_when_no_head_has_the_role():
    import pandas as pd

    df = pd.DataFrame([dict(layer=0, head=h, previous_token=p, first_token=0.2, induction=0.0, duplicate_token=0.0,
                            self=0.1) for h, p in enumerate((0.05, 0.3))])
    random = _top_line(df, "previous_token", "random weights", random_weights=True)
    assert "block 0 · head 1 (0.30)" in random and "random weights have no roles yet" in random
    trained = _top_line(df, "previous_token", "a trained model")
    assert "No head reaches 0.4 on this probe" in trained and "try the probe on The Verdict" in trained
    assert "on this text either" in _top_line(df, "previous_token", "a trained model", probe="verdict")
    df.loc[1, "previous_token"] = 0.8
    assert "No head" not in _top_line(df, "previous_token", "a trained model")


def test_bad_role_names_the_choices(atlas, a):
    with pytest.raises(gr.Error) as e:
        atlas.head_roles("copying", a)
    assert all(r in e.value.message for r in ROLES)


def test_click_moves_block_and_head(atlas, view, a):
    view.step(PROMPT, 0, 0, request=a)
    out = atlas.jump("1,2", a)
    assert isinstance(out, Jump)
    assert out.layer.value == 1 and out.head.value == 2  # gr.Slider updates
    assert out.heatmap.layout.title.text.startswith("Block 1, head 2 ")
    assert out.heatmap_avg.layout.title.text.startswith("Block 1, average")
    assert out.grid.layout.title.text.startswith("Block 1: all 4 heads")
    assert atlas.jump(" 0 , 3 ", a).head.value == 3  # spaces are fine


def test_click_before_any_step_moves_only_the_sliders(atlas, a):
    out = atlas.jump("1,3", a)
    assert out.layer.value == 1 and out.head.value == 3
    assert all(is_skip(x) for x in (out.heatmap, out.heatmap_avg, out.grid))


@pytest.mark.parametrize("text", ["", "1", "1,2,3", "a,b", "-1,2", "2,0", "0,4", "1.5,2", "9" * 40 + ",1", None,
                                  "1;2"])
def test_bad_click_text_is_skipped(atlas, view, a, text):
    view.step(PROMPT, 0, 0, request=a)
    out = atlas.jump(text, a)  # tiny model: 2 blocks, 4 heads
    assert isinstance(out, Jump) and all(is_skip(x) for x in out)


def test_role_note_only_from_measured_roles(tiny_cfg):
    model = seeded(tiny_cfg)  # a model of its own: nobody has measured it
    assert known_head_roles(model) is None and role_note(model, 1, 2) is None
    assert known_head_roles(model) is None  # asking did not measure
    df = cached_head_roles(model)
    role, score = strongest_role(df, 1, 2, threshold=0.0)
    assert role_note(model, 1, 2, threshold=0.0) == f"{ROLE_LABELS[role]} {score:.2f}"
    best = df[list(ROLES)].max(axis=1).max()
    assert role_note(model, 1, 2, threshold=float(best) + 0.01) is None  # no role strong enough
    assert role_note(model, 5, 0) is None  # no such head


def test_atlas_measures_the_visitors_model_once(ctx, atlas, a):
    model = ctx.model(ctx.visitor(a))
    atlas.head_roles("self", a)
    table = known_head_roles(model)
    assert table is not None
    atlas.head_roles("induction", a)
    assert known_head_roles(model) is table  # the same table: not measured again


def test_launch_carries_the_click_bridge():
    assert ATLAS_JS.strip() in LAUNCH_KWARGS["js"] and LAUNCH_KWARGS["js"].startswith("() =>")
    js = ATLAS_JS.strip()
    assert js.startswith("() =>") and "plotly_click" in js and "#head-atlas .js-plotly-plot" in js
    assert "#atlas-click" in js and "'input'" in js
