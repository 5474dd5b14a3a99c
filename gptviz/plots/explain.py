"""Figures of "Why this token?" (:mod:`gptviz.analysis.explain`): pure plotly functions, no gradio.

Each takes plain data (a DataFrame of :mod:`gptviz.analysis.explain`, lists) and display labels of the
tokens, and returns a ``go.Figure`` in the look of :mod:`gptviz.plots` (white background,
title at the left, explicit ``height``). Labels are escaped, so a token such as ``<b>`` or
``<|endoftext|>`` shows as itself.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..analysis.explain import decided_row
from .style import _FIXED, _GRID, _PLAIN, TICK_SIZE, _text_px, _thin_ticks

__all__ = ["attribution_waterfall", "saliency_figure", "lens_lines_figure", "group_attribution",
           "TOWARD_COLOR", "AWAY_COLOR", "TOTAL_COLOR"]

#: Waterfall colours: a piece pushing toward the target, toward the baseline, and the total.
TOWARD_COLOR, AWAY_COLOR, TOTAL_COLOR = "#54A24B", "#E45756", "#4C78A8"
_RANK_COLOR, _PROB_COLOR, _DECIDED_COLOR = "#4C78A8", "#F58518", "#54A24B"


def _esc(text: str) -> str:
    """Plotly renders a subset of HTML in titles, ticks and hovers: show ``<``, ``>``, ``&`` as themselves."""
    return html.escape(str(text), quote=False)


def group_attribution(df: pd.DataFrame, top: int = 12) -> tuple[list[str], list[float], list[str]]:
    """The waterfall's bars before the total: the ``top`` rows of largest ``|contribution|``,
    in the model's order (the order of ``df``), then one bar ``other N components`` summing
    the rest (a single leftover row is shown as itself rather than as "other 1 components").
    Returns (labels, values, kinds); the kind of the grouped bar is ``"other"``."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    values = df["contribution"].to_numpy(dtype=np.float64)
    keep = np.zeros(len(df), dtype=bool)
    if len(df) <= top + 1:
        keep[:] = True
    else:
        keep[np.argsort(-np.abs(values), kind="stable")[:top]] = True
    labels = df["component"].astype(str)[keep].tolist()
    kinds = df["kind"].astype(str)[keep].tolist() if "kind" in df else [""] * int(keep.sum())
    out = values[keep].tolist()
    if not keep.all():
        labels.append(f"other {int((~keep).sum())} components")
        out.append(float(values[~keep].sum()))
        kinds.append("other")
    return labels, out, kinds


def attribution_waterfall(df: pd.DataFrame, target_label: str, baseline_label: str, top: int = 12,
                          height: int | None = None) -> go.Figure:
    """Horizontal waterfall of :func:`gptviz.analysis.explain.logit_attribution`: the ``top`` largest
    pieces (by ``|contribution|``, in the model's order), the rest grouped as one bar, ending in
    a total bar, the logit difference ``logit[target] − logit[baseline]``. Green bars push
    toward the target, red toward the baseline. ``height``: by default ~26 px per bar."""
    labels, values, kinds = group_attribution(df, top)
    total = float(df["contribution"].sum())
    diff = float(df.attrs.get("logit_diff", total))
    t, b = _esc(target_label), _esc(baseline_label)
    y = [_esc(s) for s in labels] + ["total: logit difference"]
    hover = [f"{k}" if k else "" for k in kinds] + ["sum of all pieces"]
    n = len(y)
    height = height or 130 + 26 * n
    ends = np.concatenate([[0.0], np.cumsum(values), [total]])  # every bar's ends
    lo, hi = float(ends.min()), float(ends.max())
    pad = 0.18 * ((hi - lo) or 1.0)  # room for the outside text of the bars at either edge
    return go.Figure(go.Waterfall(
        orientation="h", y=y, x=values + [total], measure=["relative"] * len(values) + ["total"],
        text=[f"{v:+.3f}" for v in values] + [f"{total:+.3f}"], textposition="outside", cliponaxis=False,
        customdata=hover, hovertemplate="%{y}<br>%{x:+.4f} logits<br>%{customdata}<extra></extra>",
        increasing=dict(marker=dict(color=TOWARD_COLOR)), decreasing=dict(marker=dict(color=AWAY_COLOR)),
        totals=dict(marker=dict(color=TOTAL_COLOR)), connector=dict(line=dict(color="#B8BFCC", width=1)),
    ), layout=dict(
        title=dict(text=f"Why “{t}” rather than “{b}”? logit difference {diff:+.3f}", x=0.01,
                   subtitle=dict(text=f"green pushes toward “{t}”, red toward “{b}” (direct effects through the "
                                      "final norm)")),
        height=height, **_PLAIN, showlegend=False,
        margin=dict(l=16 + _text_px(y, 13), r=70, t=80, b=50),
        xaxis=dict(_FIXED, title="contribution to the logit difference (logits)", gridcolor=_GRID,
                   zerolinecolor="#8A93A3", range=[lo - pad, hi + pad]),
        yaxis=dict(_FIXED, autorange="reversed", type="category"),
    ))


def saliency_figure(labels: Sequence[str], scores: Sequence[float], height: int = 320, *,
                    title: str = "Which input tokens the prediction is most sensitive to",
                    max_ticks: int = 48) -> go.Figure:
    """One bar per input token (``labels[t]``, ``scores[t]``: e.g. :func:`gptviz.analysis.explain.saliency`);
    the largest bar is highlighted. At most ``max_ticks`` tick labels (every token on hover)."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} scores")
    s = np.asarray(scores, dtype=np.float64)
    x = list(range(len(s)))
    shown = [_esc(lab) for lab in labels]
    best = int(np.argmax(s)) if len(s) else -1
    ticks, text = _thin_ticks([str(k) for k in x], shown, max_ticks)
    return go.Figure(go.Bar(
        x=x, y=s.tolist(), marker_color=[_PROB_COLOR if k == best else _RANK_COLOR for k in x],
        customdata=shown, hovertemplate="position %{x}: %{customdata}<br>score %{y:.4g}<extra></extra>",
    ), layout=dict(
        title=dict(text=title, x=0.01), height=height, **_PLAIN, bargap=0.15,
        margin=dict(l=60, r=16, t=50, b=45 + int(0.71 * _text_px(text, TICK_SIZE))),  # labels at -45°
        xaxis=dict(_FIXED, title="input token", tickmode="array", tickvals=[int(k) for k in ticks], ticktext=text,
                   tickangle=-45, tickfont=dict(size=TICK_SIZE), showgrid=False),
        yaxis=dict(_FIXED, title="‖gradient × input‖", rangemode="tozero", gridcolor=_GRID, zerolinecolor=_GRID),
    ))


def lens_lines_figure(table: pd.DataFrame, final_label: str, height: int = 380, *,
                      top1_labels: Sequence[str] | None = None, max_ticks: int = 32) -> go.Figure:
    """The final token's rank (left axis, log scale, 1 = top, top at the top) and probability
    (right axis) after every sub-block of :func:`gptviz.analysis.explain.lens_table`; the stretch from
    which it stays top-1 through the end is shaded and its first row marked ("decided at
    block N"). ``top1_labels``: each row's top-1 token, for the hover."""
    n = len(table)
    x = list(range(n))
    names = [f"block {int(layer)} · {after}" for layer, after in zip(table["layer"], table["after"])]
    f = _esc(final_label)
    tops = [_esc(s) for s in top1_labels] if top1_labels is not None else [str(i) for i in table["top1_id"]]
    if len(tops) != n:
        raise ValueError(f"{len(tops)} top-1 labels for {n} rows")
    rank = (table["final_rank"].to_numpy(dtype=np.int64) + 1).tolist()
    prob = table["final_prob"].to_numpy(dtype=np.float64).tolist()
    custom = list(zip(names, tops))
    fig = go.Figure([
        go.Scatter(x=x, y=rank, name=f"rank of “{f}” (1 = top)", mode="lines+markers",
                   line=dict(color=_RANK_COLOR, width=2.5), customdata=custom,
                   hovertemplate="%{customdata[0]}<br>rank %{y}<br>top-1 there: %{customdata[1]}<extra></extra>"),
        go.Scatter(x=x, y=prob, name=f"probability of “{f}”", mode="lines+markers", yaxis="y2",
                   line=dict(color=_PROB_COLOR, width=2, dash="dot"), customdata=custom,
                   hovertemplate="%{customdata[0]}<br>p = %{y:.3~%}<extra></extra>"),
    ])
    worst = max(rank, default=1)
    rank_range = [np.log10(worst * 1.6), np.log10(0.7)]  # log axis, 1 (the top) at the top
    k = decided_row(table) if n else None
    if k is not None:
        block = int(table["layer"].iloc[k])
        fig.add_vrect(x0=k - 0.5, x1=n - 0.5, fillcolor=_DECIDED_COLOR, opacity=0.10, line_width=0, layer="below")
        fig.add_vline(x=k, line=dict(color=_DECIDED_COLOR, dash="dash", width=1.5),
                      annotation=dict(text=f"decided at block {block}", font=dict(size=12, color=_DECIDED_COLOR)),
                      annotation_position="top right")
    ticks, text = _thin_ticks([str(i) for i in x], names, max_ticks)
    fig.update_layout(
        title=dict(text=f"When did the model settle on “{f}”? (logit lens after every sub-block)", x=0.01),
        height=height, **_PLAIN, hovermode="x unified" if n <= 64 else "closest",
        legend=dict(orientation="h", x=0, xanchor="left", y=1.02, yanchor="bottom"),  # under the title
        margin=dict(l=70, r=70, t=90, b=45 + int(0.71 * _text_px(text, TICK_SIZE))),  # labels at -45°
        xaxis=dict(_FIXED, tickmode="array", tickvals=[int(t) for t in ticks], ticktext=text, tickangle=-45,
                   tickfont=dict(size=TICK_SIZE), range=[-0.5, max(n, 1) - 0.5], showgrid=False),
        yaxis=dict(_FIXED, title="rank (log scale, 1 = top)", type="log", range=rank_range, gridcolor=_GRID),
        yaxis2=dict(_FIXED, title="probability", overlaying="y", side="right", rangemode="tozero", tickformat=".2~p",
                    tickmode="auto",  # its own round ticks, not synced to the rank axis's
                    showgrid=False),
    )
    return fig
