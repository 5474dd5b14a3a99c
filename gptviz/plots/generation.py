"""The Generate view's figures: next-token candidates, sampling, attention heatmaps, the logit lens."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go

from ..formatting import percent
from .style import _FIXED, _GRID, _PLAIN, TICK_SIZE, _text_px, _thin_ticks

#: Colour of causally masked cells (a query may not attend to later keys).
MASKED_COLOR = "#D0D4DC"


def topk_figure(pieces: Sequence[str], probs: Sequence[float], ids: Sequence[int], *, chosen: int = 0,
                title: str = "Next-token candidates", height: int = 360) -> go.Figure:
    """Horizontal bars of the top-k next tokens, most probable on top; bar ``chosen`` highlighted."""
    labels = [f"{p}  ({i})" for p, i in zip(pieces, ids)]  # ids make labels unique
    colors = ["#E45756" if k == chosen else "#4C78A8" for k in range(len(labels))]
    return go.Figure(go.Bar(
        x=list(probs), y=labels, orientation="h", marker_color=colors,
        text=[percent(p) for p in probs], textposition="outside", cliponaxis=False,
        hovertemplate="%{y}<br>probability %{x:.4f}<extra></extra>",
    ), layout=dict(
        title=dict(text=title, x=0.01), height=height, **_PLAIN,
        margin=dict(l=16 + _text_px(labels, 13), r=70, t=50, b=50),
        xaxis=dict(_FIXED, title="probability (softmax over the vocabulary)", tickformat=".3~%", rangemode="tozero",
                   gridcolor=_GRID, zerolinecolor=_GRID),
        yaxis=dict(_FIXED, autorange="reversed", type="category"),
    ))


def sampling_figure(pieces: Sequence[str], probs: Sequence[float], sample_probs: Sequence[float],
                    kept: Sequence[bool], ids: Sequence[int], *, chosen: int | None = None, n_kept: int | None = None,
                    title: str = "Next-token candidates", height: int = 360) -> go.Figure:
    """The top-k candidates before and after temperature / top-k / top-p: the model's own softmax
    as light bars, the distribution actually drawn from as solid bars, excluded tokens greyed, the
    cut-off drawn under the last candidate that may be drawn; bar ``chosen`` (if any) highlighted."""
    labels = [f"{p}  ({i})" for p, i in zip(pieces, ids)]
    solid = ["#E45756" if k == chosen else ("#4C78A8" if ok else "#C7CCD6") for k, ok in enumerate(kept)]
    last_kept = max((k for k, ok in enumerate(kept) if ok), default=None)
    shapes, notes = [], []
    if last_kept is not None and last_kept < len(labels) - 1:
        shapes.append(dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=last_kept + 0.5, y1=last_kept + 0.5,
                           line=dict(color="#B34", width=2, dash="dash")))
        note = f"cut-off: {n_kept:,} token{'s' if n_kept != 1 else ''} may be drawn" if n_kept else "cut-off"
        notes.append(dict(xref="paper", x=1, yref="y", y=last_kept + 0.5, text=note, showarrow=False,
                          xanchor="right", yanchor="top", bgcolor="white", font=dict(size=11, color="#B34")))
    return go.Figure([
        go.Bar(x=list(probs), y=labels, orientation="h", name="model's softmax", marker_color="#D5DEEA",
               hovertemplate="%{y}<br>softmax %{x:.4f}<extra></extra>"),
        go.Bar(x=[q if ok else 0 for q, ok in zip(sample_probs, kept)], y=labels, orientation="h",
               name="after temperature and cut-offs", marker_color=solid, width=0.45,
               text=[percent(q) if ok else "cut off" for q, ok in zip(sample_probs, kept)], textposition="outside",
               cliponaxis=False, hovertemplate="%{y}<br>drawn with %{x:.4f}<extra></extra>"),
    ], layout=dict(
        shapes=shapes, annotations=notes,
        title=dict(text=title, x=0.01), height=height, barmode="overlay", **_PLAIN,
        legend=dict(orientation="h", x=0, y=-0.22, font=dict(size=11)),
        margin=dict(l=16 + _text_px(labels, 13), r=70, t=50, b=80),
        xaxis=dict(_FIXED, title="probability", tickformat=".3~%", rangemode="tozero", gridcolor=_GRID,
                   zerolinecolor=_GRID),
        yaxis=dict(_FIXED, autorange="reversed", type="category"),
    ))


def _causal(weights: Any) -> np.ndarray:
    """The weights to draw: rounded, NaN above the diagonal (the masked cells), float32 (the page
    gets 4 bytes a weight instead of 8: the all-heads grid's JSON is a third smaller)."""
    w = np.asarray(weights, dtype=np.float64)
    return np.where(np.triu(np.ones(w.shape[-2:], dtype=bool), k=1), np.nan, np.round(w, 4)).astype(np.float32)


def _mask_shape(n: int, xref: str = "x", yref: str = "y") -> dict:
    """The cells above the diagonal of an n × n grid (query r, key c > r) as one grey staircase
    polygon in cell-index coordinates: the causal mask, drawn without per-cell data."""
    steps = "".join(f" L{r + 0.5},{r + 0.5} L{r + 0.5},{r - 0.5}" for r in range(n - 2, -1, -1))
    path = f"M0.5,-0.5 L{n - 0.5},-0.5 L{n - 0.5},{n - 1.5}{steps} Z"
    return dict(type="path", path=path, xref=xref, yref=yref, fillcolor=MASKED_COLOR, line=dict(width=0))


def _cells(positions: Sequence[int], labels: Sequence[str]) -> list[str]:
    """Unique category names ("5 ·am") so hover names each token without per-cell data."""
    return [f"{p} {s}" for p, s in zip(positions, labels)]


def attention_figure(weights: Any, labels: Sequence[str], positions: Sequence[int], *, title: str,
                     height: int = 520, max_ticks: int = 32) -> go.Figure:
    """Heatmap of one causal attention matrix ``(W, W)``: row = query, column = key.

    Axes are labelled with the tokens' display pieces (``positions`` are their absolute
    positions); the masked cells above the diagonal are grey; hover gives the query token,
    the key token and the weight.
    """
    z = _causal(weights)
    cells = _cells(positions, labels)
    ticks, text = _thin_ticks(cells, list(labels), max_ticks)
    axis = dict(_FIXED, type="category", tickmode="array", tickvals=ticks, ticktext=text, showgrid=False,
                zeroline=False, tickfont=dict(size=TICK_SIZE))
    label_px = _text_px(text, TICK_SIZE)
    return go.Figure(go.Heatmap(
        z=z, x=cells, y=cells, colorscale="Blues", zmin=0, hoverongaps=False,
        colorbar=dict(title=dict(text="weight"), thickness=14),
        hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.4f}<extra></extra>",
    ), layout=dict(
        title=dict(text=title, x=0.01), height=height, **_PLAIN,
        shapes=[_mask_shape(len(cells))] if len(cells) > 1 else [],
        margin=dict(l=40 + label_px, r=10, t=50, b=45 + int(0.87 * label_px)),  # x labels at -60°: sin 60° ≈ 0.87
        xaxis=dict(axis, title="key (attended to)", tickangle=-60, side="bottom", constrain="domain"),
        yaxis=dict(axis, title="query (attending), grey: masked", autorange="reversed", scaleanchor="x",
                   constrain="domain"),
    ))


def attention_grid_figure(weights: Any, labels: Sequence[str], positions: Sequence[int], *, title: str,
                          height: int = 640, cols: int | None = None) -> go.Figure:
    """Every head of one layer, ``(n_heads, W, W)``, as a grid of small heatmaps on one colour scale.

    Grey is the causal mask; hover shows head, query, key and weight.
    """
    z = _causal(weights)
    n_heads, n = z.shape[0], z.shape[-1]
    cols = cols or math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    gap_x, gap_y = 0.02, 0.3 / rows  # room for each head's title
    cell_w, cell_h = (1 - gap_x * (cols - 1)) / cols, (1 - gap_y * (rows - 1)) / rows
    cells = _cells(positions, labels)
    hidden = dict(_FIXED, type="category", showticklabels=False, showgrid=False, zeroline=False)
    traces, axes, titles, masks = [], {}, [], []
    for h in range(n_heads):  # axes laid out by hand: make_subplots costs ~60 ms here
        r, c = divmod(h, cols)
        suffix = str(h + 1) if h else ""
        x0, y1 = c * (cell_w + gap_x), 1 - r * (cell_h + gap_y)
        axes[f"xaxis{suffix}"] = dict(hidden, domain=[x0, x0 + cell_w], anchor=f"y{suffix}")
        axes[f"yaxis{suffix}"] = dict(hidden, domain=[y1 - cell_h, y1], anchor=f"x{suffix}", autorange="reversed")
        titles.append(dict(text=f"head {h}", x=x0 + cell_w / 2, y=y1, xref="paper", yref="paper", showarrow=False,
                           xanchor="center", yanchor="bottom", font=dict(size=12)))
        if n > 1:
            masks.append(_mask_shape(n, f"x{suffix}", f"y{suffix}"))
        traces.append(go.Heatmap(z=z[h], x=cells, y=cells, xaxis=f"x{suffix}", yaxis=f"y{suffix}",
                                 coloraxis="coloraxis", hoverongaps=False,
                                 hovertemplate=f"head {h}<br>query %{{y}}<br>key %{{x}}<br>weight %{{z:.4f}}"
                                               "<extra></extra>"))
    return go.Figure(traces, dict(
        axes, title=dict(text=title, x=0.01), height=height, **_PLAIN, annotations=titles, shapes=masks,
        margin=dict(l=10, r=10, t=70, b=10),
        coloraxis=dict(colorscale="Blues", cmin=0, colorbar=dict(title=dict(text="weight"), thickness=14)),
    ))


def logit_lens_figure(pieces: Sequence[Sequence[str]], probs: Sequence[Sequence[float]], x_labels: Sequence[str], *,
                      title: str = "Logit lens: each layer's top-1 next token", height: int = 460,
                      max_chars: int = 8) -> go.Figure:
    """Layer × step grid of logit-lens predictions (``final_norm`` then ``out_head`` on each block's output).

    ``pieces[s][l]`` / ``probs[s][l]``: the top-1 token and its probability after block ``l``
    at step ``s``; ``x_labels[s]``: the token the model read at that step. Colour = probability;
    each cell shows the token and its probability; the top row is the model's own prediction.
    The colour scale runs from 0 to the largest probability shown, so the small differences of
    a random-weight model (top-1 p ≈ 0.0002) stay visible. Allow ~28 px of ``height`` per
    layer for the two lines of text.
    """
    p = np.asarray(probs, dtype=np.float64).T  # (n_layers, n_steps)
    text = np.asarray(pieces, dtype=object).T
    short = np.vectorize(lambda s: s if len(s) <= max_chars else s[: max_chars - 1] + "…", otypes=[object])(text)
    n_layers, n_steps = p.shape
    x = [f"{s} {lab}" for s, lab in zip(range(n_steps), x_labels)]  # unique category per step
    return go.Figure(go.Heatmap(
        z=p, x=x, y=list(range(n_layers)), text=short, customdata=text, texttemplate="%{text}<br>%{z:.2~p}",
        textfont=dict(size=11), colorscale="Viridis", zmin=0, zmax=float(np.max(p, initial=0)) or 1,
        colorbar=dict(title=dict(text="top-1 prob"), thickness=14, tickformat=".2~p"),
        hovertemplate="read %{x}<br>after block %{y}: %{customdata} (p = %{z:.3~p})<extra></extra>",
    ), layout=dict(
        title=dict(text=title, x=0.01), height=height, **_PLAIN,
        margin=dict(l=70, r=10, t=50, b=45 + int(0.71 * _text_px(x_labels, TICK_SIZE))),  # labels at -45°
        xaxis=dict(_FIXED, title="step (token read)", tickangle=-45, type="category", tickvals=x,
                   ticktext=list(x_labels), tickfont=dict(size=TICK_SIZE)),
        yaxis=dict(_FIXED, title="block (trf_blocks.i)", dtick=1 if n_layers <= 24 else 4),
    ))
