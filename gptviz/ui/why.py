""""Why this token?" in the Generate view: for the step being viewed, the exact split of
``logit(chosen) − logit(other)`` into the embeddings, every head, every feed-forward and the final
norm; which input tokens moved the choice (gradient × input); and the block from which the logit
lens already predicts the token. Each costs at most one forward of the visitor's context (plus
one backward for saliency) and takes its turn on the model like other analyses."""

from __future__ import annotations

from typing import Any, NamedTuple

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from ..analysis.explain import decided_at, lens_table, logit_attribution, saliency
from ..formatting import percent
from ..generation.session import GenerationSession
from ..plots.explain import attribution_waterfall, lens_lines_figure, saliency_figure
from ..plots.style import empty_figure
from ..settings import RANDOM
from ..tokenizer import get_encoding, label
from .components import Plot, csv_button, csv_file
from .generate import GenerateView
from .html import chips_html, esc, md_code
from .outputs import components
from .serving import AppContext, Turns, Visitor, error

WATERFALL_HEIGHT, SALIENCY_HEIGHT, LENS_LINES_HEIGHT = 460, 300, 380
WHY_COLUMNS = ["component", "kind", "contribution"]
RANDOM_NOTE = ("These are random weights (seed 123): the split is exact, but no head has learned a job yet, so the "
               "pieces are noise of similar size. Load gpt2 on the Model tab to see heads that matter.")


class Why(NamedTuple):
    why_note: str
    why_other: Any  # the "compared with" choice: the step's other candidates
    why_plot: go.Figure
    why_table: pd.DataFrame
    why_csv: str


class Lens(NamedTuple):
    lens_lines: go.Figure
    lens_csv: str


class Saliency(NamedTuple):
    saliency_chips: str
    saliency_plot: go.Figure


class WhyPanel:
    def __init__(self, ctx: AppContext, generate: GenerateView) -> None:
        self.ctx, self.generate = ctx, generate
        self.c: dict[str, Any] = {}

    def _step(self, step: Any, request: gr.Request) -> tuple[Visitor, GenerationSession, int, list[int]]:
        """(visitor, session, the viewed step k, the ids step k read)."""
        v = self.ctx.visitor(request)
        with v.lock:
            s = v.session
            if s is None or not s.steps:
                raise error("Press Step first: “Why this token?” explains a step the model took.")
            k = self.generate.viewed(s, step) or len(s.steps)
            start, end = s.read_by(k)
            return v, s, k, s.ids[start:end]

    def why(self, step: Any, other: Any, request: gr.Request) -> Why:
        """Step ``step`` (0: the newest): why the model chose its token over ``other`` (a token id
        among the step's candidates; default the runner-up). One forward."""
        v, s, k, ids = self._step(step, request)
        r = s.steps[k - 1]
        others = [c.token_id for c in r.candidates if c.token_id != r.token_id]
        try:
            baseline = int(other)
        except (TypeError, ValueError):
            baseline = others[0]
        baseline = baseline if baseline in others else others[0]
        table = logit_attribution(s.model, ids, r.token_id, baseline)
        enc = get_encoding()
        chosen, against = label(r.token_id, enc, 20), label(baseline, enc, 20)
        top = table.reindex(table["contribution"].abs().sort_values(ascending=False).index).head(3)
        leaders = ", ".join(f"{esc(str(c))} ({x:+.3g})" for c, x in zip(top["component"], top["contribution"]))
        note = (f"**Step {k}** chose {md_code(chosen)} over {md_code(against)}: its logit is "
                f"**{table.attrs['logit_diff']:+.4g}** higher. That difference is exactly the sum of the pieces below "
                f"(through `final_norm` with this step's own scale, so the split is linear). Largest pieces: "
                f"{leaders}.")
        if v.spec.source == RANDOM:
            note += f"\n\n{RANDOM_NOTE}"
        choices = [(f"{label(c.token_id, enc, 20)} ({percent(c.prob)})", c.token_id) for c in r.candidates
                   if c.token_id != r.token_id]
        shown = table[WHY_COLUMNS].round({"contribution": 5})
        return Why(note, gr.Dropdown(choices=choices, value=baseline),
                   self._titled(attribution_waterfall(table, chosen, against, height=WATERFALL_HEIGHT), k), shown,
                   csv_file(table, f"why-step-{k}", getattr(request, "session_hash", "")))

    @staticmethod
    def _titled(fig: go.Figure, k: int) -> go.Figure:
        return fig.update_layout(title=dict(text=f"Step {k}: {fig.layout.title.text}"))

    def lens_detail(self, step: Any, request: gr.Request) -> Lens:
        """The viewed step's logit lens after every sub-block: the rank and probability of the token
        it chose, and the block from which it stays first ("decided at"). One forward."""
        _, s, k, ids = self._step(step, request)
        table = lens_table(s.model, ids)
        chosen = label(s.steps[k - 1].token_id, None, 20)
        fig = lens_lines_figure(table, chosen, height=LENS_LINES_HEIGHT)
        at = decided_at(table)
        fig.update_layout(title=dict(text=f"Step {k}: “{esc(chosen)}” " + (f"decided at block {at}" if at is not None
                                                                          else "first only at the very end")))
        return Lens(fig, csv_file(table, f"lens-step-{k}", getattr(request, "session_hash", "")))

    def saliency(self, step: Any, request: gr.Request) -> Saliency:
        """Which input tokens moved the viewed step's choice: gradient × input on their embeddings
        (its L2 norm per token). One forward and one backward, on the visitor's own graph."""
        _, s, k, ids = self._step(step, request)
        r, enc = s.steps[k - 1], get_encoding()
        scores = saliency(s.model, ids, r.token_id)
        top = float(scores.max())
        shade = (scores / top).tolist() if top > 0 else [0.0] * len(ids)
        chips = chips_html(ids, enc, limit=self.ctx.settings.max_chips, shade=shade) + \
            '<div class="legend">the tokens step ' + str(k) + ' read, shaded by saliency: how much each one moves ' \
            'log p(chosen)</div>'
        chosen = label(r.token_id, enc, 20)
        return Saliency(chips, saliency_figure([label(i, enc, 12) for i in ids], scores.tolist(), height=SALIENCY_HEIGHT,
                                               title=f"Saliency of the {len(ids)} input tokens for “{chosen}”"))

    # --------------------------------------------------------------- layout and wiring
    def build(self) -> dict[str, Any]:
        c = self.c
        with gr.Accordion("Why this token?", open=False, elem_id="why-acc"):
            with gr.Row(equal_height=True):
                c["why_btn"] = gr.Button("Explain the viewed step", variant="primary", scale=1, elem_id="why-btn")
                c["why_other"] = gr.Dropdown([], label="compared with", scale=2, elem_id="why-other",
                                             info="another candidate of that step", allow_custom_value=False)
            c["why_note"] = gr.Markdown("", elem_id="why-note")
            with gr.Row():
                with gr.Column(scale=3):
                    c["why_plot"] = Plot(empty_figure("Press “Explain the viewed step”",
                                                               height=WATERFALL_HEIGHT),
                                            show_label=False, elem_id="why-plot")
                with gr.Column(scale=2):
                    c["lens_lines"] = Plot(empty_figure("", height=LENS_LINES_HEIGHT), show_label=False,
                                              elem_id="lens-lines")
                    c["why_table"] = gr.Dataframe(pd.DataFrame(columns=WHY_COLUMNS), interactive=False,
                                                  show_label=False, max_height=300, elem_id="why-table",
                                                  elem_classes="compact")
                    with gr.Row():
                        c["why_csv"] = csv_button("why-csv")
                        c["lens_csv"] = csv_button("lens-csv")
            c["saliency_chips"] = gr.HTML("", elem_id="saliency-chips")
            c["saliency_plot"] = Plot(empty_figure("", height=SALIENCY_HEIGHT), show_label=False,
                                         elem_id="saliency-plot")
        return c

    def wire(self) -> None:
        c, g, ctx = self.c, self.generate.c, self.ctx
        shown, slow = {**ctx.model_event, "show_progress": "minimal"}, Turns.ANALYSIS
        step = g["view_step"]
        gr.on([c["why_btn"].click, c["why_other"].input], ctx.turns(self.why, slow), [step, c["why_other"]],
              components(Why, c), api_name="why", **shown)
        c["why_btn"].click(ctx.turns(self.lens_detail, slow), step, components(Lens, c), api_name="lens_detail",
                           **shown).then(ctx.turns(self.saliency, slow), step, components(Saliency, c),
                                         api_name="saliency", **shown)
