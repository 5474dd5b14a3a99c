"""The Train view's figures: the book's loss plot (train and validation loss against tokens seen,
epochs on a second axis) and the gradient that reaches each block."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

from .style import _FIXED, _GRID, _PLAIN, PAIR_COLORS

#: The book's two lines: training loss (solid) and validation loss (dotted).
TRAIN_COLOR, VAL_COLOR = PAIR_COLORS


def loss_figure(tokens_seen: Sequence[int], train_losses: Sequence[float], val_losses: Sequence[float], *,
                tokens_per_epoch: int, epochs: int, title: str = "Loss while training", height: int = 380) -> go.Figure:
    """The book's ``plot_losses`` (5.2): both losses against the tokens seen at each evaluation,
    the epochs marked on a second x axis above (one tick per epoch boundary)."""
    top = max(tokens_per_epoch * epochs, max(tokens_seen, default=0), 1)
    return go.Figure([
        go.Scatter(x=list(tokens_seen), y=list(train_losses), name="training loss", mode="lines+markers",
                   line=dict(color=TRAIN_COLOR, width=2.5), marker=dict(size=5),
                   hovertemplate="%{x:,} tokens seen<br>training loss %{y:.3f}<extra></extra>"),
        go.Scatter(x=list(tokens_seen), y=list(val_losses), name="validation loss", mode="lines+markers",
                   line=dict(color=VAL_COLOR, width=2.5, dash="dot"), marker=dict(size=5),
                   hovertemplate="%{x:,} tokens seen<br>validation loss %{y:.3f}<extra></extra>"),
        go.Scatter(x=[0, top], y=[None, None], xaxis="x2", showlegend=False, hoverinfo="skip"),  # holds the epoch axis
    ], layout=dict(
        title=dict(text=title, x=0.01), height=height, **_PLAIN, margin=dict(l=60, r=16, t=96, b=50),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.0, yanchor="bottom"),
        xaxis=dict(_FIXED, title="tokens seen", range=[0, top], gridcolor=_GRID, zerolinecolor=_GRID),
        xaxis2=dict(_FIXED, overlaying="x", side="top", range=[0, top], showgrid=False, title="epoch",
                    tickvals=[k * tokens_per_epoch for k in range(epochs + 1)], ticktext=[str(k) for k in range(epochs + 1)]),
        yaxis=dict(_FIXED, title="loss (cross entropy)", rangemode="tozero", gridcolor=_GRID, zerolinecolor=_GRID),
    ))


def grad_norm_figure(norms: Sequence[float], *, title: str = "Gradient reaching each block",
                     height: int = 300) -> go.Figure:
    """One bar per transformer block: the L2 norm of the gradient of its parameters (the last step's)."""
    labels = [f"block {i}" for i in range(len(norms))]
    return go.Figure([
        go.Bar(x=labels, y=list(norms), marker_color=TRAIN_COLOR, text=[f"{n:.3g}" for n in norms],
               textposition="outside", cliponaxis=False, hovertemplate="%{x}: gradient norm %{y:.4g}<extra></extra>"),
    ], layout=dict(
        title=dict(text=title, x=0.01), height=height, **_PLAIN, margin=dict(l=60, r=16, t=60, b=40),
        xaxis=dict(_FIXED, type="category"),
        yaxis=dict(_FIXED, title="‖gradient‖₂", rangemode="tozero", gridcolor=_GRID, zerolinecolor=_GRID),
    ))
