"""The app's own flavours of Gradio components: exportable figures and tables.

* :class:`Plot` is ``gr.Plot`` whose toolbar camera saves a PNG at twice the shown size, with
  the figure's title and axes (plotly's own image export, configured); the page script adds an
  SVG button beside it (:data:`EXPORT_JS`).
* :class:`DirectPlot` shows the same figure with the same toolbar, drawn by plotly.js straight
  into the page (one draw per new figure): the Generate view's figures, redrawn at every Step.
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

__all__ = ["Plot", "DirectPlot", "rendered", "csv_file", "EXPORT_CONFIG", "EXPORT_JS", "csv_button"]

#: plotly's config for every figure: PNG at 2× from the camera, no logo, no "Share chart" (a
#: button plotly.js 3 shows by default: it uploads the figure to Chart Studio).
EXPORT_CONFIG = {"toImageButtonOptions": {"format": "png", "scale": 2, "filename": "gptviz"}, "displaylogo": False,
                 "showSendToCloud": False}
_CONFIG_JSON = json.dumps(EXPORT_CONFIG)

#: ``withSvg(P, config)``: plotly ``config`` plus an "SVG" button (``P.downloadImage``: the
#: plotly.js instance that drew the figure), shared by :data:`EXPORT_JS` and :class:`DirectPlot`.
_WITH_SVG_JS = """
  const ICON = {width: 1000, height: 1000, path: 'M100 850h800v100H100zM450 50h100v500l150-150 70 70-270 270-270-270 70-70 150 150z'};
  const withSvg = (P, config) => Object.assign({}, config, {modeBarButtonsToAdd: [{
    name: 'Download as SVG', title: 'Download as SVG', icon: ICON, click: (gd) => P.downloadImage(
      gd, {format: 'svg', filename: 'gptviz-' + ((gd.closest('.block[id]') || gd.closest('[id]') || {}).id || 'figure').replace(/[^a-z0-9-]/gi, '')})}]});
"""

#: Page script: an "SVG" button in every gr.Plot's toolbar (plotly's downloadImage, in the browser).
EXPORT_JS = """
() => {""" + _WITH_SVG_JS + """
  const hook = () => {  // every later render gets the button: no extra redraw
    const P = window.Plotly;
    if (!P || P.__gptviz) return;
    const react = P.react;
    P.react = function (gd, data, layout, config) { return react.call(this, gd, data, layout, withSvg(P, config)); };
    P.__gptviz = true;
    for (const gd of document.querySelectorAll('.js-plotly-plot')) {  // gr.Plot's drawn before the hook
      if (gd._fullLayout && !gd.__plotly) react.call(P, gd, gd.data, gd.layout, withSvg(P, gd._context));
    }
  };
  // Kept on: gr.Plot's plotly.js (window.Plotly once its chunk loads) may come after DirectPlot's.
  setInterval(hook, 300);
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


_PLOTLY_JS = Path(go.__file__).parent.parent / "package_data" / "plotly.min.js"  # the plotly package's own
gr.set_static_paths([str(_PLOTLY_JS)])

#: DirectPlot's script: one ``Plotly.react`` per new figure into the component's own div.
_DIRECT_JS = """
const P = () => window.__gptvizPlotly || (window.__gptvizPlotly = window.Plotly);""" + _WITH_SVG_JS + """
const draw = () => {
  const box = element.querySelector('.gv-plot'), plotly = box && (box.__plotly || (box.__plotly = P()));
  if (!plotly || !props.value) return;
  const f = JSON.parse(props.value);
  f.layout.autosize = true;
  plotly.react(box, f.data, f.layout, withSvg(plotly, Object.assign({responsive: true}, f.config || {})));
};
const wait = () => { if (P()) draw(); else setTimeout(wait, 30); };
wait();
watch('value', draw);
"""


class DirectPlot(gr.HTML):
    """NEW (speed): a figure drawn by plotly.js straight into the page, with :class:`Plot`'s
    export toolbar (PNG at 2×, SVG): one ``Plotly.react`` per new figure. gr.Plot's frontend
    parses, reacts, then calls ``Plots.resize`` with autosize forced for every value; Chromium's
    profiler put the Generate view's five figures at ~480 ms of the page's JavaScript per Step
    with gr.Plot and ~180 ms with this (2026-12-03 dev machine). Takes what :class:`Plot` takes:
    a figure, or what :func:`rendered` made of one."""

    def __init__(self, value: Any = None, *, elem_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(self._json(value), html_template='<div class="gv-plot"></div>', js_on_load=_DIRECT_JS,
                         head=f'<script src="/gradio_api/file={_PLOTLY_JS}"></script>', apply_default_css=False,
                         elem_id=elem_id, elem_classes=["gv-direct-plot"], **kwargs)

    @staticmethod
    def _json(value: Any) -> Any:
        if isinstance(value, go.Figure):
            value = _plot_data(value)
        return value.plot if isinstance(value, PlotData) else value

    def postprocess(self, value: Any) -> Any:
        return self._json(value)


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
