"""The app's component flavours: what a figure becomes on its way to the page."""

from __future__ import annotations

import json

import plotly.graph_objects as go

from gptviz.ui.components import EXPORT_CONFIG, DirectPlot, Plot, rendered


def figure() -> go.Figure:
    return go.Figure(go.Bar(x=[1, 2], y=["a", "b"], orientation="h"), dict(title=dict(text="Step 1: a")))


def test_direct_plot_sends_the_figure_and_the_export_config_as_plotlys_json():
    fig = figure()
    sent = json.loads(DirectPlot().postprocess(fig))
    assert sent["layout"]["title"]["text"] == "Step 1: a"
    assert sent["data"][0]["type"] == "bar" and list(sent["data"][0]["y"]) == ["a", "b"]
    assert sent["config"] == EXPORT_CONFIG and EXPORT_CONFIG["showSendToCloud"] is False


def test_direct_plot_takes_what_rendered_made_in_the_models_turn_as_gr_plot_does():
    fig = figure()
    made = rendered(fig)  # PlotData, serialised in the turn
    assert DirectPlot().postprocess(made) == made.plot == Plot().postprocess(fig).plot
    assert DirectPlot().postprocess(None) is None
