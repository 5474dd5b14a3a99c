"""The parameter figure of the Parameters view: a treemap of where the parameters live."""

from __future__ import annotations

from typing import Any, Mapping

import plotly.graph_objects as go

from ..config import GPTConfig
from ..params import GROUPS, param_breakdown

#: One colour per parameter group (the subtotal groups of :func:`gptviz.params.param_breakdown`).
GROUP_COLORS = {
    "embeddings": "#4C78A8",
    "attention": "#F58518",
    "feed-forward": "#54A24B",
    "layer norms": "#B279A2",
    "output head": "#E45756",
}


def params_figure(cfg: GPTConfig | Mapping[str, Any], height: int = 600) -> go.Figure:
    """Treemap of where the parameters live: model → group → component (summed over blocks).

    Areas are parameter counts. A tied output head adds no parameters, so it has no tile of
    its own: the token embedding's tile says it doubles as the output head, and so does the
    subtitle; an untied head is a tile as large as the token embedding.
    """
    cfg = GPTConfig.coerce(cfg)
    df = param_breakdown(cfg)
    total = int(df.loc[df["kind"] == "total", "total"].iloc[0])
    parts = df[(df["kind"] == "component") & (df["total"] > 0)]
    subtotals = df[df["kind"] == "subtotal"].set_index("group")["total"]

    ids, labels, parents, values, colors, hover = ["model"], ["GPTModel"], [""], [total], ["#EEEEEE"], [
        f"GPTModel: {total:,} parameters"
    ]
    for group in GROUPS:
        value = int(subtotals[group])
        if value:
            ids.append(group), labels.append(group), parents.append("model"), values.append(value)
            colors.append(GROUP_COLORS[group]), hover.append(f"{group}: {value:,} ({100 * value / total:.2f} %)")
    for r in parts.itertuples():
        label = r.component
        if cfg.tie_weights and r.module == "tok_emb":
            label = "token embedding = output head (tied)"
        ids.append(f"{r.group}/{r.component}"), labels.append(label), parents.append(r.group)
        values.append(int(r.total)), colors.append(GROUP_COLORS[r.group])
        hover.append(
            f"<b>{r.module}</b> {r.shape}<br>{r.formula} = {r.params_each:,}"
            f"{f' × {r.count} blocks' if r.count > 1 else ''}<br>"
            f"{r.total:,} parameters, {r.percent:.2f} % of the model"
            + (f"<br>{r.note}" if r.note else "")
        )

    head = int(df.loc[df["module"] == "tok_emb", "total"].iloc[0])
    subtitle = (
        f"output head tied to tok_emb: it shares those {head:,} parameters and adds none"
        if cfg.tie_weights
        else f"output head not tied: its own {head:,} parameters, as many as tok_emb"
    )
    return go.Figure(
        go.Treemap(
            ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
            marker=dict(colors=colors, line=dict(width=1, color="white")),
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
            texttemplate="<b>%{label}</b><br>%{value:,}<br>%{percentRoot:.1%}",
            pathbar=dict(visible=True), sort=False,
        ), layout=dict(
        title=dict(text=f"Where the {total:,} parameters live", subtitle=dict(text=subtitle), x=0.01),
        height=height, margin=dict(l=8, r=8, t=70, b=8), uniformtext=dict(minsize=11, mode="hide"),
        font=dict(size=13),
    ))
