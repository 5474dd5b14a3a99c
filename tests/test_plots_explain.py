"""The figures of gptviz.plots.explain, on hand-made tables (and one real attribution)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptviz.analysis.explain import logit_attribution
from gptviz.plots.explain import attribution_waterfall, group_attribution, lens_lines_figure, saliency_figure

from .conftest import ROOT


def attribution_df(values: list[float], logit_diff: float | None = None) -> pd.DataFrame:
    """A table shaped like logit_attribution's: embeddings, then heads of one block, then the norm."""
    n = len(values)
    names = ["embeddings"] + [f"block 0 · head {h}" for h in range(n - 2)] + ["final norm shift"]
    kinds = ["embed"] + ["head"] * (n - 2) + ["norm"]
    df = pd.DataFrame({"component": names, "layer": [None] + [0] * (n - 2) + [None],
                       "head": [None] + list(range(n - 2)) + [None], "kind": kinds, "contribution": values})
    df.attrs.update(target=1, baseline=2, logit_diff=sum(values) if logit_diff is None else logit_diff)
    return df


def waterfall(fig: go.Figure) -> go.Waterfall:
    (trace,) = fig.data
    assert isinstance(trace, go.Waterfall)
    return trace


def test_waterfall_keeps_the_largest_and_groups_the_rest():
    values = [0.5, -3.0, 0.01, 2.0, -0.02, 0.7, 0.03, -0.04, 0.05, 1.5]
    df = attribution_df(values)
    fig = attribution_waterfall(df, "Paris", "London", top=4)
    w = waterfall(fig)
    assert list(w.measure) == ["relative"] * 5 + ["total"]
    # the four largest |values|, in the table's (the model's) order, then the other six summed
    assert list(w.y[:4]) == ["block 0 · head 0", "block 0 · head 2", "block 0 · head 4", "final norm shift"]
    assert list(w.x[:4]) == [-3.0, 2.0, 0.7, 1.5]
    assert w.y[4] == "other 6 components"
    assert math.isclose(w.x[4], 0.5 + 0.01 - 0.02 + 0.03 - 0.04 + 0.05, abs_tol=1e-12)
    assert math.isclose(w.x[-1], sum(values), abs_tol=1e-12)  # the total bar is the sum ...
    assert math.isclose(sum(w.x[:-1]), w.x[-1], abs_tol=1e-12)  # ... of the bars before it
    assert "Paris" in fig.layout.title.text and "London" in fig.layout.title.text
    assert f"{sum(values):+.3f}" in fig.layout.title.text
    assert fig.layout.paper_bgcolor == "white" and fig.layout.plot_bgcolor == "white"
    lo, hi = fig.layout.xaxis.range
    running = np.cumsum(w.x[:-1])
    assert lo < min(0, running.min()) and hi > max(0, running.max())  # every bar fits in the range


def test_waterfall_without_enough_rows_to_group_shows_them_all():
    values = [0.4, -0.1, 0.2, 0.3]
    w = waterfall(attribution_waterfall(attribution_df(values), "a", "b", top=3))  # one leftover: shown itself
    assert not any(str(y).startswith("other") for y in w.y)
    assert list(w.x[:-1]) == values and list(w.measure).count("total") == 1


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=40), top=st.integers(1, 15))
def test_grouping_preserves_the_sum_and_keeps_the_largest(values, top):
    labels, grouped, kinds = group_attribution(attribution_df(values), top)
    assert math.isclose(sum(grouped), sum(values), abs_tol=1e-9)
    if len(values) > top + 1:
        assert len(grouped) == top + 1 and labels[-1] == f"other {len(values) - top} components"
        assert kinds[-1] == "other"
        shown = sorted(abs(v) for v in grouped[:-1])
        rest = sorted(abs(v) for v in values)[: len(values) - top]
        assert min(shown) >= max(rest)
    else:
        assert grouped == values


@pytest.mark.numeric  # compares the model's numbers
def test_waterfall_of_a_real_attribution_totals_its_logit_difference(tiny_model):
    df = logit_attribution(tiny_model, [464, 3290, 318, 257], 1263)
    w = waterfall(attribution_waterfall(df, " cat", " dog"))
    assert w.measure[-1] == "total" and w.y[-2] == f"other {len(df) - 12} components"
    # the total bar is the attribution's sum; that sum is the logit difference (tested in test_explain.py)
    assert math.isclose(w.x[-1], df["contribution"].sum(), abs_tol=1e-12)
    assert abs(w.x[-1] - df.attrs["logit_diff"]) < 1e-3


def test_labels_are_escaped_not_rendered_as_markup():
    fig = attribution_waterfall(attribution_df([1.0, -0.5, 0.2]), "<|endoftext|>", "<b>")
    assert "&lt;|endoftext|&gt;" in fig.layout.title.text and "&lt;b&gt;" in fig.layout.title.text
    assert "<b>" not in fig.layout.title.text
    sal = saliency_figure(["<b>", "x"], [0.1, 0.2])
    assert list(sal.layout.xaxis.ticktext) == ["&lt;b&gt;", "x"]


def test_saliency_figure_has_a_bar_per_token():
    labels, scores = ["Hello", ",", " I", " am"], [0.1, 0.05, 0.3, 0.2]
    fig = saliency_figure(labels, scores, height=300)
    (bar,) = fig.data
    assert isinstance(bar, go.Bar)
    assert list(bar.y) == scores and list(bar.x) == [0, 1, 2, 3]
    assert list(fig.layout.xaxis.ticktext) == labels and list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]
    assert list(bar.customdata) == labels  # every token on hover
    colors = list(bar.marker.color)
    assert colors[2] != colors[0] and len(set(colors)) == 2  # the largest is highlighted
    assert fig.layout.height == 300 and fig.layout.title.text
    with pytest.raises(ValueError):
        saliency_figure(["a"], [0.1, 0.2])


def test_saliency_figure_thins_ticks_of_long_inputs():
    n = 500
    fig = saliency_figure([f"t{k}" for k in range(n)], list(np.linspace(0, 1, n)), max_ticks=40)
    assert len(fig.data[0].y) == n
    assert len(fig.layout.xaxis.tickvals) <= 40 and fig.layout.xaxis.tickvals[-1] == n - 1


def lens(ranks: list[int], probs: list[float] | None = None, final: int = 9) -> pd.DataFrame:
    n = len(ranks)
    return pd.DataFrame({
        "layer": [k // 2 for k in range(n)], "after": ["attention", "feed-forward"] * (n // 2),
        "top1_id": [final if r == 0 else 100 + k for k, r in enumerate(ranks)], "top1_prob": [0.5] * n,
        "final_id": [final] * n, "final_rank": ranks, "final_prob": probs or [0.1 * (k + 1) / n for k in range(n)],
        "entropy": [1.0] * n, "kl_from_final": [0.1] * n,
    })


def test_lens_lines_plot_rank_and_probability_and_mark_the_decision():
    table = lens([40, 3, 0, 1, 0, 0], [0.01, 0.05, 0.2, 0.15, 0.3, 0.4])
    fig = lens_lines_figure(table, " Paris", top1_labels=["a", "b", " Paris", "c", " Paris", " Paris"])
    rank, prob = fig.data
    assert list(rank.y) == [41, 4, 1, 2, 1, 1]  # 1 = top
    assert list(prob.y) == [0.01, 0.05, 0.2, 0.15, 0.3, 0.4] and prob.yaxis == "y2"
    assert fig.layout.yaxis.type == "log"
    lo, hi = fig.layout.yaxis.range  # reversed: rank 1 at the top
    assert lo > math.log10(41) and hi < 0
    assert list(fig.layout.xaxis.ticktext) == [
        "block 0 · attention", "block 0 · feed-forward", "block 1 · attention", "block 1 · feed-forward",
        "block 2 · attention", "block 2 · feed-forward"]
    assert " Paris" in fig.layout.title.text
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(lines) == 1 and lines[0].x0 == 4  # decided at row 4 (block 2), not at the lost lead of row 2
    assert any("decided at block 2" in a.text for a in fig.layout.annotations)


def test_lens_lines_without_a_decision_mark_nothing():
    fig = lens_lines_figure(lens([0, 0, 0, 1]), "x", height=333)
    assert not fig.layout.shapes and not fig.layout.annotations
    assert fig.layout.height == 333


def test_no_gradio_import():
    code = ("import sys; import gptviz.plots.explain, gptviz.analysis.explain; "
            "assert 'gradio' not in sys.modules, sorted(m for m in sys.modules if 'gradio' in m)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
