"""The Inside view's figures: two runs side by side (ablation, precision) and the KV cache's work."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ..formatting import percent
from .style import _FIXED, _GRID, _PLAIN, PAIR_COLORS, _text_px


def comparison_figure(labels: Sequence[str], first: Sequence[float], second: Sequence[float], *,
                      names: tuple[str, str] = ("normal", "ablated"), title: str = "Next-token candidates",
                      height: int = 420) -> go.Figure:
    """Grouped horizontal bars: two runs' probabilities of the same tokens (``labels``, top row
    first), e.g. the next-token candidates with and without some attention heads."""
    return go.Figure([
        go.Bar(x=list(values), y=list(labels), orientation="h", name=name, marker_color=color,
               text=[percent(v) for v in values], textposition="outside", cliponaxis=False,
               hovertemplate=f"%{{y}}<br>{name}: %{{x:.4~%}}<extra></extra>")
        for name, values, color in zip(names, (first, second), PAIR_COLORS)
    ], layout=dict(
        title=dict(text=title, x=0.01), height=height, **_PLAIN, barmode="group", bargap=0.25,
        margin=dict(l=16 + _text_px(labels, 13), r=70, t=80, b=50),  # the legend sits under the title
        legend=dict(orientation="h", x=0, xanchor="left", y=1.01, yanchor="bottom"),
        xaxis=dict(_FIXED, title="probability (softmax over the vocabulary)", tickformat=".3~%", rangemode="tozero",
                   gridcolor=_GRID, zerolinecolor=_GRID),
        yaxis=dict(_FIXED, autorange="reversed", type="category"),
    ))


def cache_work_figure(contexts: Sequence[int], cached: Sequence[float], full: Sequence[float], *,
                      now: int | None = None, title: str = "Work of one generation step",
                      height: int = 320) -> go.Figure:
    """FLOPs of one generation step against the context length: with a KV cache (only the new
    position runs) and without one (the whole context is recomputed); ``now`` marks the
    current context length. A log scale: the cached step's work barely grows."""
    fig = go.Figure([
        go.Scatter(x=list(contexts), y=np.asarray(values, dtype=np.float64) / 1e9, name=name, mode="lines",
                   line=dict(color=color, width=2.5),
                   hovertemplate=f"{name}<br>context %{{x}} tokens: %{{y:.3g}} GFLOP<extra></extra>")
        for name, values, color in (("without a cache", full, PAIR_COLORS[1]), ("with the KV cache", cached,
                                                                               PAIR_COLORS[0]))
    ])
    if now is not None:
        fig.add_vline(x=now, line=dict(color="#555c6b", dash="dot", width=1.5),
                      annotation=dict(text=f"now: {now} tokens", font=dict(size=12)),
                      annotation_position="top right")
    fig.update_layout(
        title=dict(text=title, x=0.01), height=height, **_PLAIN, margin=dict(l=60, r=16, t=80, b=50),
        legend=dict(orientation="h", x=0, xanchor="left", y=1.01, yanchor="bottom"),  # under the title
        xaxis=dict(_FIXED, title="context (tokens)", gridcolor=_GRID, zerolinecolor=_GRID, rangemode="tozero"),
        yaxis=dict(_FIXED, title="GFLOP per step (log scale)", type="log", dtick=1, gridcolor=_GRID),
    )
    return fig
