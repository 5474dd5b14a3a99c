"""Plotly figures of the head-role atlas (:mod:`gptviz.analysis.heads`): pure functions, no gradio."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..analysis.heads import ROLES
from .style import _FIXED, _PLAIN

__all__ = ["ROLE_LABELS", "head_roles_figure"]

#: Display names of the roles (axis and hover text).
ROLE_LABELS = {
    "previous_token": "previous token",
    "first_token": "first token (sink)",
    "induction": "induction",
    "duplicate_token": "duplicate token",
    "self": "self",
}


def head_roles_figure(df: pd.DataFrame, role: str, *, title: str | None = None, height: int | None = None) -> go.Figure:
    """Layers × heads heatmap of one role's score (a :func:`gptviz.analysis.heads.head_roles` table).

    Row = block (layer 0 on top), column = head; colour scale fixed to 0–1 so figures of
    different roles and models compare. Hover shows every role's score of the cell. Each
    cell's ``customdata`` is ``[layer, head, score of each role in ROLES order]``, so a click
    (``points[0].customdata[:2]``) maps back to the head. ``height`` defaults to ~22 px per
    layer (at least 300).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    missing = [c for c in ("layer", "head", *ROLES) if c not in df.columns]
    if missing:
        raise ValueError(f"the table lacks column(s) {missing}: pass the DataFrame of head_roles()")
    n_layers, n_heads = int(df["layer"].max()) + 1, int(df["head"].max()) + 1
    cube = np.full((n_layers, n_heads, 2 + len(ROLES)), np.nan)
    layer, head = df["layer"].to_numpy(int), df["head"].to_numpy(int)
    cube[layer, head, 0], cube[layer, head, 1] = layer, head
    for k, r in enumerate(ROLES):
        cube[layer, head, 2 + k] = df[r].to_numpy(float)
    z = np.round(cube[..., 2 + ROLES.index(role)], 4)  # (n_layers, n_heads)
    lines = "".join(f"<br>{ROLE_LABELS[r]}: %{{customdata[{2 + k}]:.3f}}" for k, r in enumerate(ROLES))
    return go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), customdata=np.round(cube, 4),
        colorscale="Viridis", zmin=0, zmax=1, hoverongaps=False, xgap=1, ygap=1,
        colorbar=dict(title=dict(text="score"), thickness=14),
        hovertemplate=f"block %{{y}}, head %{{x}}{lines}<extra></extra>",
    ), layout=dict(
        title=dict(text=title or f"Head roles: {ROLE_LABELS[role]}", x=0.01),
        height=height or max(300, 90 + 22 * n_layers), **_PLAIN, margin=dict(l=60, r=10, t=50, b=50),
        xaxis=dict(_FIXED, title="head", dtick=1 if n_heads <= 25 else 5, showgrid=False, zeroline=False),
        yaxis=dict(_FIXED, title="block (trf_blocks.i)", autorange="reversed", dtick=1 if n_layers <= 24 else 4,
                   showgrid=False, zeroline=False),
    ))
