"""The head-role atlas, in the Generate tab: what each attention head of the visitor's model does.

Opening the accordion measures every head once per shared model and probe
(:func:`gptviz.analysis.heads.cached_head_roles`: one forward pass over a probe repeated twice:
random tokens, or the start of The Verdict) and draws a layers × heads heatmap of one role's score
(:func:`gptviz.plots.heads.head_roles_figure`; hover shows every role). Clicking a cell sends that
head to the Generate view: its block and head sliders jump there and its attention heatmaps redraw.

gr.Plot has no click event, so :data:`ATLAS_JS` (run once on page load, through
``demo.launch(js=...)``, see :func:`gptviz.ui.page.launch_kwargs`) bridges it: it listens for
Plotly's ``plotly_click`` on the atlas plot (re-attached whenever Gradio draws a new plot div) and
writes ``"layer,head"`` into a hidden textbox (``#atlas-click``, ``visible="hidden"``: in the DOM,
not shown), then fires a DOM ``input`` event (the textbox's value follows) and a ``keypress`` (from
which Gradio 6's Textbox sends its ``.input`` event), which runs :meth:`AtlasView.jump`.

:func:`role_note` names a head's strongest role for titles, from roles already measured (it never
measures them itself).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from ..analysis import heads as _heads
from ..analysis.heads import known_head_roles  # noqa: F401 (re-exported: the atlas's public helpers)
from ..analysis.heads import ROLES, cached_head_roles
from ..model import GPTModel
from ..plots.heads import ROLE_LABELS, head_roles_figure
from ..plots.style import empty_figure
from ..settings import RANDOM
from ..tokenizer import get_encoding
from ..train import read_text
from .components import Plot, csv_button, csv_file
from .generate import GenerateView
from .outputs import components, skip
from .serving import AppContext, Turns, Visitor, error
from .step_view import THRESHOLD, role_note  # noqa: F401 (role_note: the atlas's public helper)

__all__ = ["ATLAS_JS", "Atlas", "Jump", "AtlasView", "known_head_roles", "role_note"]

DEFAULT_ROLE = "previous_token"
#: The probes a visitor may choose: random token ids, or a real text (The Verdict's first tokens).
PROBES = {"random": "random tokens, repeated", "verdict": "The Verdict, repeated"}
VERDICT_PROBE_TOKENS = 256  # enough for two rows of the longest probe (2 × 64 tokens)
TOP_N = 3  # heads named under the figure

INTRO = (
    "Each head is measured once on a **probe**: random tokens (or the start of The Verdict), then the same "
    "tokens again. A score is the "
    "average attention the head puts where the role says: **previous token** (the token just before), "
    "**first token** (position 0), **induction** (in the repeat, the token that came *after* this token's "
    "first occurrence — what to copy next), **duplicate token** (this token's first occurrence) and **self**. "
    "Pick a role, hover a cell for all five scores, **click a cell** to see that head's attention above."
)
SINK_NOTE = (
    "**Why does every head stare at the first token?** Softmax makes a head's weights sum to 1, so a head with "
    "nothing useful to read must still put its attention somewhere, and trained GPT-2 parks it on the first "
    "token, an *attention sink* whose value vector is tiny, so that attention adds almost nothing to the "
    "output. A high first-token score therefore often means “this head is idle here”, not “the first word "
    "matters”."
)
CLOSED_MESSAGE = "Open this panel to measure every head of your model"

#: Run once on page load (``demo.launch(js=ATLAS_JS)``): clicking an atlas cell writes
#: "layer,head" into the hidden #atlas-click textbox and fires its input event.
ATLAS_JS = r"""
() => {
  let last = '', lastAt = 0;
  const send = (layer, head) => {
    const box = document.querySelector('#atlas-click textarea, #atlas-click input');
    const text = `${layer},${head}`, now = performance.now();
    if (!box || (text === last && now - lastAt < 150)) return;  // one click, one request
    last = text;
    lastAt = now;
    box.value = text;
    box.dispatchEvent(new Event('input', { bubbles: true }));  // the textbox's bound value follows
    // Gradio 6's Textbox fires its input event from a keypress (after the value updates), not
    // from the DOM input event: a keypress that is not Enter makes it send the value.
    box.dispatchEvent(new KeyboardEvent('keypress', { key: '0', bubbles: true }));
  };
  const onClick = (event) => {
    const point = event && event.points && event.points[0];
    if (!point) return;
    const cd = point.customdata;  // [layer, head, scores...]
    const layer = Array.isArray(cd) ? cd[0] : point.y, head = Array.isArray(cd) ? cd[1] : point.x;
    if (Number.isInteger(layer) && Number.isInteger(head)) send(layer, head);
  };
  const hook = () => {
    for (const plot of document.querySelectorAll('#head-atlas .js-plotly-plot')) {
      if (typeof plot.on !== 'function') continue;  // Plotly has not drawn it yet
      // Already listening? Plotly keeps (or, after a new plot on the same div, copies) its
      // listeners: look for ours there, so a redrawn or re-created plot is hooked exactly once.
      const ev = plot._ev;
      if (ev && typeof ev.listeners === 'function' ? ev.listeners('plotly_click').includes(onClick)
          : plot.dataset.atlasHooked) continue;
      plot.dataset.atlasHooked = '1';
      plot.on('plotly_click', onClick);
    }
  };
  let queued = false;  // at most one look per animation frame, however many DOM changes
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; hook(); });
  }).observe(document.body, { childList: true, subtree: true });
  hook();
}
"""

_CLICK = re.compile(r"\s*(\d{1,4})\s*,\s*(\d{1,4})\s*")


class Atlas(NamedTuple):
    """The atlas figure and the line under it naming the role's strongest heads."""

    atlas: go.Figure
    atlas_top: str
    atlas_csv: str  # every head's scores, as CSV


class Jump(NamedTuple):
    """A cell was clicked: the Generate view's sliders and its three attention figures."""

    layer: Any
    head: Any
    heatmap: go.Figure
    heatmap_avg: go.Figure
    grid: go.Figure


def _check_role(role: Any) -> str:
    if role not in ROLES:
        raise error(f"Unknown role {role!r}: choose one of {', '.join(ROLES)}.")
    return role


def _check_probe(probe: Any) -> str:
    if probe not in PROBES:
        raise error(f"Unknown probe {probe!r}: choose one of {', '.join(PROBES)}.")
    return probe


def verdict_probe_ids() -> tuple[int, ...]:
    """The first :data:`VERDICT_PROBE_TOKENS` tokens of The Verdict (the text probe)."""
    return tuple(get_encoding().encode(read_text()[:4000])[:VERDICT_PROBE_TOKENS])


def _top_line(df: pd.DataFrame, role: str, label: str, random_weights: bool = False, probe: str = "random") -> str:
    """Markdown naming the role's strongest heads (and what a low score means)."""
    top = df.nlargest(TOP_N, role)
    heads = ", ".join(f"block {int(r.layer)} · head {int(r.head)} ({getattr(r, role):.2f})"
                      for r in top.itertuples())
    line = f"**Strongest {ROLE_LABELS[role]} heads** of {label}, on {PROBES[probe]}: {heads}."
    if float(top[role].iloc[0]) >= THRESHOLD:
        return line
    line += f" No head reaches {THRESHOLD} on this probe:"
    if random_weights:
        return line + (" random weights have no roles yet (their attention is about even); load gpt2 or the "
                       "model trained here on the Model tab to see the heads training made.")
    if probe == "random":
        return line + (" this model shows no such head on random tokens. A model trained on a small text never "
                       "saw most of them; try the probe on The Verdict.")
    return line + " this model shows no such head on this text either."


class AtlasView:
    def __init__(self, ctx: AppContext, generate: GenerateView) -> None:
        self.ctx, self.generate = ctx, generate
        self.c: dict[str, Any] = {}

    def _model(self, v: Visitor) -> GPTModel:
        with v.lock:  # the visitor's current model (a model switch holds this lock)
            return self.ctx.model(v)

    # --------------------------------------------------------------- handlers
    def head_roles(self, role: str, request: gr.Request, probe: str = "random",
                   progress: gr.Progress = gr.Progress()) -> Atlas:
        """What every head of your model does, for one role: a layers × heads heatmap of that role's
        score (0 to 1; hover a cell for all five). Measured once per model and probe (one forward pass
        over a probe repeated twice: random tokens, or The Verdict's first tokens; a few seconds for
        the 124M model), then instant."""
        role, probe = _check_role(role), _check_probe(probe)
        v = self.ctx.visitor(request)
        model = self._model(v)
        text = None if probe == "random" else verdict_probe_ids()
        df = _heads.known_head_roles(model, text_ids=text)
        if df is None:
            progress(0, desc="Measuring every head on the probe (one forward pass)")
            try:
                df = cached_head_roles(model, text_ids=text)
            except ValueError as e:  # e.g. a context too short for the probe
                raise error(f"Could not measure the heads of {v.spec.label}: {e}") from None
        title = f"Head roles: {ROLE_LABELS[role]} (probe: {PROBES[probe]})"
        return Atlas(head_roles_figure(df, role, title=title),
                     _top_line(df, role, v.spec.label, v.spec.source == RANDOM, probe),
                     csv_file(df, "head-roles", getattr(request, "session_hash", "")))

    def jump(self, text: str, request: gr.Request, step: Any = None) -> Jump:
        """A cell of the atlas was clicked (``"layer,head"``): move the Generate view's block and head
        sliders there and redraw its attention heatmaps (of the viewed ``step``; None: the newest).
        Anything else is ignored."""
        match = _CLICK.fullmatch(text or "") if isinstance(text, str) else None
        if match is None:
            return skip(Jump)
        layer, head = int(match[1]), int(match[2])
        v = self.ctx.visitor(request)
        s = v.session
        cfg = s.model.cfg if s is not None else self._model(v).cfg
        if not (layer < cfg.n_layers and head < cfg.n_heads):
            return skip(Jump)
        figures = self.generate.attention(layer, head, request, step)  # skipped before the first Step
        return Jump(gr.Slider(value=layer), gr.Slider(value=head), *figures)

    # --------------------------------------------------------------- layout and wiring
    def build(self) -> dict[str, Any]:
        """The accordion (closed: nothing is measured until a visitor opens it)."""
        c = self.c
        with gr.Accordion("Head roles: what each head does", open=False, elem_id="atlas-acc") as c["atlas_acc"]:
            gr.Markdown(INTRO, elem_id="atlas-intro")
            with gr.Row():
                c["atlas_role"] = gr.Radio([(ROLE_LABELS[r], r) for r in ROLES], value=DEFAULT_ROLE, label="Role",
                                           elem_id="atlas-role", scale=3)
                c["atlas_probe"] = gr.Radio([(label, p) for p, label in PROBES.items()], value="random",
                                            label="Probe", elem_id="atlas-probe", scale=2)
            c["atlas"] = Plot(empty_figure(CLOSED_MESSAGE, height=300), show_label=False,
                                 elem_id="head-atlas")
            c["atlas_top"] = gr.Markdown("", elem_id="atlas-top")
            c["atlas_csv"] = csv_button("atlas-csv")
            gr.Markdown(SINK_NOTE, elem_id="atlas-sink")
            c["atlas_click"] = gr.Textbox("", visible="hidden", elem_id="atlas-click", show_label=False)
        return c

    def wire(self) -> None:
        c, ctx, g = self.c, self.ctx, self.generate.c
        shown = {**ctx.model_event, "show_progress": "full"}  # the first measurement reports progress
        gr.on([c["atlas_acc"].expand, c["atlas_role"].input, c["atlas_probe"].input],
              ctx.turns(self.head_roles, Turns.ANALYSIS), [c["atlas_role"], c["atlas_probe"]], components(Atlas, c), api_name="head_roles", trigger_mode="always_last",
              **shown)
        viewed = [g["view_step"]] if "view_step" in g else []  # the Generate view's step selector
        c["atlas_click"].input(ctx.turns(self.jump), [c["atlas_click"], *viewed], components(Jump, g),
                               api_visibility="private", trigger_mode="always_last", **ctx.model_event)

