"""The look every gptviz figure shares: white backgrounds, fixed margins, tick labels, a placeholder."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

# Each figure is built in one go.Figure(data, layout=...) call: fig.update_layout parses its keys
# as property paths, ~15 ms per figure here, and the step's figures are redrawn at every click.

#: White backgrounds: plotly_white's look without its template, which costs ~7 ms per figure
#: to validate and copy (these figures are redrawn on every step).
_PLAIN = dict(paper_bgcolor="white", plot_bgcolor="white", font=dict(size=13))
_GRID = "#E5E9F0"
#: Font size of token labels on heatmap axes.
TICK_SIZE = 12
#: Axes whose tick labels are placed without measuring each one in the browser (plotly's
#: automatic margins and overflow checks force a page layout per label: ~300 ms in a Gradio page).
_FIXED = dict(automargin=False, ticklabeloverflow="allow")


def _text_px(labels: Sequence[str], size: int) -> int:
    """Approximate width in pixels of the longest label at font ``size`` (for fixed margins)."""
    return int(0.62 * size * max((len(s) for s in labels), default=0))


def empty_figure(message: str, height: int = 360) -> go.Figure:
    """A blank figure carrying a message (placeholder before anything is computed)."""
    return go.Figure(layout=dict(
        annotations=[dict(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=15))],
        height=height, xaxis=dict(visible=False), yaxis=dict(visible=False), margin=dict(l=10, r=10, t=30, b=10),
        **_PLAIN,
    ))


def _thin_ticks(ticks: Sequence[str], labels: Sequence[str], max_ticks: int) -> tuple[list[str], list[str]]:
    """At most ``max_ticks`` evenly spread tick labels (the rest stay readable on hover)."""
    stride = max(1, -(-len(ticks) // max_ticks))
    keep = range(len(ticks) - 1, -1, -stride)[::-1]  # always label the newest token
    return [ticks[i] for i in keep], [labels[i] for i in keep]


#: The two runs a comparison figure sets side by side (e.g. normal and ablated).
PAIR_COLORS = ("#4C78A8", "#F58518")
