"""The generation figures of gptviz.plots (the parameter figure is tested in test_params.py)."""

from __future__ import annotations

import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptviz.plots.generation import MASKED_COLOR, attention_figure, attention_grid_figure, logit_lens_figure, topk_figure
from gptviz.plots.style import empty_figure


def causal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random causal attention: rows sum to 1, zeros above the diagonal."""
    w = shape[-1]
    x = rng.random(shape) * np.tril(np.ones((w, w)))
    return x / x.sum(-1, keepdims=True)


def polygon(path: str) -> list[tuple[float, float]]:
    """Vertices of an SVG path made of M/L commands."""
    return [tuple(map(float, xy.split(","))) for xy in re.findall(r"[ML]\s*([-\d.]+,[-\d.]+)", path)]


def inside(point: tuple[float, float], poly: list[tuple[float, float]]) -> bool:
    """Even-odd ray casting."""
    x, y = point
    hit = False
    for (x1, y1), (x2, y2) in zip(poly, poly[1:] + poly[:1]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


def mask_cells(shape, n: int) -> np.ndarray:
    """Which cell centres (row = query r, column = key c, in index coordinates) the mask shape covers."""
    poly = polygon(shape.path)
    return np.array([[inside((c, r), poly) for c in range(n)] for r in range(n)])


@settings(max_examples=25, deadline=None)
@given(w=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_attention_figure_shows_weights_below_and_mask_above_the_diagonal(w, seed):
    weights = causal(np.random.default_rng(seed), w, w)
    labels = [f"t{i}" for i in range(w)]
    fig = attention_figure(weights, labels, list(range(100, 100 + w)), title="x")
    (heat,) = fig.data
    above = np.triu(np.ones((w, w), dtype=bool), k=1)
    z = np.array(heat.z, dtype=float)
    assert np.isnan(z[above]).all() and not np.isnan(z[~above]).any()
    np.testing.assert_allclose(z[~above], weights[~above], atol=1e-4)
    if w > 1:  # the grey mask covers exactly the cells above the diagonal
        (mask,) = fig.layout.shapes
        assert mask.fillcolor == MASKED_COLOR and (mask_cells(mask, w) == above).all()
    else:
        assert not fig.layout.shapes


def test_attention_figure_hover_names_query_and_key_tokens():
    w = 5
    labels = ["Hello", ",", "·I", "·am", "·x"]
    fig = attention_figure(causal(np.random.default_rng(0), w, w), labels, [3, 4, 5, 6, 7], title="Block 0")
    heat = fig.data[0]
    assert list(heat.y) == ["3 Hello", "4 ,", "5 ·I", "6 ·am", "7 ·x"] and list(heat.x) == list(heat.y)
    assert "query %{y}" in heat.hovertemplate and "key %{x}" in heat.hovertemplate and "%{z" in heat.hovertemplate
    assert list(fig.layout.xaxis.ticktext) == labels and list(fig.layout.xaxis.tickvals) == list(heat.x)
    assert fig.layout.yaxis.autorange == "reversed"  # the first query on top
    assert heat.colorbar.title.text == "weight"
    assert fig.layout.height == 520


def test_attention_figure_thins_tick_labels_but_keeps_the_newest():
    w = 64
    labels = [f"p{i}" for i in range(w)]
    fig = attention_figure(causal(np.random.default_rng(1), w, w), labels, list(range(w)), title="t", max_ticks=20)
    ticks = list(fig.layout.xaxis.tickvals)
    assert len(ticks) <= 20 and ticks[-1] == "63 p63"
    assert list(fig.layout.xaxis.ticktext) == [t.split()[1] for t in ticks]


def test_attention_grid_has_one_heatmap_per_head_on_one_colour_scale():
    n_heads, w = 12, 6
    weights = causal(np.random.default_rng(2), n_heads, w, w)
    fig = attention_grid_figure(weights, [f"t{i}" for i in range(w)], list(range(w)), title="grid")
    assert len(fig.data) == n_heads and all(t.coloraxis == "coloraxis" for t in fig.data)
    above = np.triu(np.ones((w, w), dtype=bool), k=1)
    for h, trace in enumerate(fig.data):
        z = np.array(trace.z, dtype=float)
        np.testing.assert_allclose(np.nan_to_num(z), weights[h], atol=1e-4)
        assert f"head {h}" in trace.hovertemplate
        mask = fig.layout.shapes[h]  # each head's mask sits on that head's axes
        assert (mask.xref, mask.yref) == (trace.xaxis, trace.yaxis) and (mask_cells(mask, w) == above).all()
    titles = [a.text for a in fig.layout.annotations]
    assert titles == [f"head {h}" for h in range(n_heads)]
    assert fig.layout.coloraxis.colorbar.title.text == "weight"
    cols = math.ceil(math.sqrt(n_heads))
    assert fig.layout[f"xaxis{cols}"].domain[1] == pytest.approx(1.0)  # `cols` subplots fill the first row
    assert fig.layout[f"xaxis{cols + 1}"].domain[0] == pytest.approx(0.0)  # the next head starts a new row


def test_topk_figure_orders_bars_and_highlights_the_choice():
    pieces, probs, ids = ["·the", "·the", ","], [0.5, 0.3, 0.2], [262, 383, 11]
    fig = topk_figure(pieces, probs, ids, chosen=0, title="Step 1")
    bar = fig.data[0]
    assert list(bar.x) == probs
    assert len(set(bar.y)) == 3  # equal pieces stay separate bars (ids in the labels)
    assert all(str(i) in label for i, label in zip(ids, bar.y))
    colors = list(bar.marker.color)
    assert colors[0] != colors[1] and colors[1] == colors[2]
    assert list(bar.text) == ["50.0%", "30.0%", "20.0%"]
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.title.text == "Step 1"


def test_logit_lens_figure_is_layers_by_steps():
    # 3 steps, 2 layers: pieces[s][l]
    pieces = [["a", "b"], ["c", "d"], ["e", "averyveryverylongpiece"]]
    probs = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    fig = logit_lens_figure(pieces, probs, ["x0", "x1", "x2"], max_chars=8)
    hm = fig.data[0]
    z = np.array(hm.z, dtype=float)
    assert z.shape == (2, 3)  # (layers, steps)
    np.testing.assert_allclose(z, np.array(probs).T)
    text = np.array(hm.text, dtype=object)
    assert text[0, 1] == "c" and text[1, 2] == "averyve…"
    assert np.array(hm.customdata, dtype=object)[1, 2] == "averyveryverylongpiece"  # full piece on hover
    assert list(fig.layout.xaxis.ticktext) == ["x0", "x1", "x2"]
    assert hm.zmin == 0 and hm.zmax == pytest.approx(0.6)  # the colour scale ends at the largest probability
    assert "%{text}" in hm.texttemplate and "%{z" in hm.texttemplate  # token + prob


def test_empty_figure_carries_its_message():
    fig = empty_figure("Press Step", height=300)
    assert isinstance(fig, go.Figure) and fig.layout.annotations[0].text == "Press Step"
    assert fig.layout.height == 300 and not fig.data
