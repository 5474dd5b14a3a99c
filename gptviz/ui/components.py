"""The app's own flavours of Gradio components: exportable figures and tables.

* :class:`Plot` is ``gr.Plot`` whose toolbar camera saves a PNG at twice the shown size, with
  the figure's title and axes (plotly's own image export, configured); the page script adds an
  SVG button beside it (:data:`EXPORT_JS`).
* :func:`rendered` serialises a handler's figures now, the way :class:`Plot` would later: the
  context calls it in the model's turn (see :mod:`gptviz.ui.serving`).
* :func:`csv_file` writes a table for a ``gr.DownloadButton`` (every table has one).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from gradio.components.plot import PlotData

__all__ = ["Plot", "rendered", "csv_file", "EXPORT_CONFIG", "EXPORT_JS", "csv_button"]

#: plotly's config for every figure: PNG at 2× from the camera, no logo.
EXPORT_CONFIG = {"toImageButtonOptions": {"format": "png", "scale": 2, "filename": "gptviz"}, "displaylogo": False}
_CONFIG_JSON = json.dumps(EXPORT_CONFIG)

#: Page script: an "SVG" button in every plot's toolbar (plotly's downloadImage, in the browser).
EXPORT_JS = """
() => {
  const ICON = {width: 1000, height: 1000, path: 'M100 850h800v100H100zM450 50h100v500l150-150 70 70-270 270-270-270 70-70 150 150z'};
  const svg = {name: 'Download as SVG', title: 'Download as SVG', icon: ICON, click: (gd) => window.Plotly.downloadImage(
    gd, {format: 'svg', filename: 'gptviz-' + ((gd.closest('[id]') || {}).id || 'figure').replace(/[^a-z0-9-]/gi, '')})};
  const withSvg = (config) => Object.assign({}, config, {modeBarButtonsToAdd: [svg]});
  const hook = () => {  // every later render gets the button: no extra redraw
    const P = window.Plotly;
    if (!P || P.__gptviz) return !!P;
    const react = P.react;
    P.react = function (gd, data, layout, config) { return react.call(this, gd, data, layout, withSvg(config)); };
    P.__gptviz = true;
    for (const gd of document.querySelectorAll('.js-plotly-plot')) {  // the ones drawn before the hook
      if (gd._fullLayout) react.call(P, gd, gd.data, gd.layout, withSvg(gd._context));
    }
    return true;
  };
  const timer = setInterval(() => { if (hook()) clearInterval(timer); }, 300);
}
"""


def _plot_data(figure: go.Figure) -> PlotData:
    """What the page gets for a figure: plotly's JSON, with the export configuration."""
    return PlotData(type="plotly", plot=figure.to_json()[:-1] + f', "config": {_CONFIG_JSON}}}')


class Plot(gr.Plot):
    """``gr.Plot`` with the export configuration (a template of gr.Plot: same frontend). A value
    that :func:`rendered` already serialised passes through."""

    is_template = True

    def postprocess(self, value: Any) -> Any:
        return _plot_data(value) if isinstance(value, go.Figure) else super().postprocess(value)


def rendered(result: Any) -> Any:
    """A handler's result with every plotly figure in it (alone, or in a tuple of outputs)
    serialised as :class:`Plot` would serialise it after the handler: called in the model's turn,
    so that plotly's Python work does not run beside another visitor's forward pass."""
    if isinstance(result, go.Figure):
        return _plot_data(result)
    if isinstance(result, tuple):
        items = [rendered(x) for x in result]
        return type(result)._make(items) if hasattr(result, "_fields") else tuple(items)
    return result


_FILES = Path(tempfile.mkdtemp(prefix="gptviz-tables-"))


def csv_file(table: pd.DataFrame, name: str, owner: str = "") -> str:
    """``table`` as ``gptviz-<name>.csv`` in a folder of the visitor's (``owner``: its session)."""
    folder = _FILES / (re.sub(r"[^A-Za-z0-9_-]", "", owner)[:64] or "anonymous")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gptviz-{name}.csv"
    table.to_csv(path, index=False)
    return str(path)


def csv_button(elem_id: str, value: str | None = None) -> gr.DownloadButton:
    """The small "CSV" button under a table."""
    return gr.DownloadButton("⬇ CSV", value=value, size="sm", variant="secondary", elem_id=elem_id, scale=0,
                             min_width=90)
