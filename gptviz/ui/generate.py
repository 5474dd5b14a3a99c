"""The Generate view: step through greedy generation one token at a time, with the candidates,
the KV-cache readout, attention heatmaps of any block and head, and the logit lens."""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import gradio as gr
import plotly.graph_objects as go

from ..generation.session import GenerationSession
from ..plots.style import empty_figure
from ..tokenizer import encode, get_encoding
from . import sampling
from .components import DirectPlot
from .controls import Checkbox, Slider
from .html import chips_html, note
from .inputs import index, prompt_ids
from .outputs import components, skip
from .serving import AppContext, Visitor, error
from .step_view import GRID_HEIGHT, HEATMAP_HEIGHT, LENS_HEIGHT, TOPK_HEIGHT, StepPictures

DEFAULT_PROMPT = "Hello, I am"
FIRST_MESSAGE = "Press Step to generate the next token"


class Main(NamedTuple):
    """What every action (Step, Step ×N, Undo, Reset) redraws at once."""

    gen_text: str
    topk: go.Figure
    heatmap: go.Figure
    kv: str
    step_json: dict
    view_step: Any  # the step selector: after an action, at the newest step

    @classmethod
    def blank(cls, message: str) -> "Main":
        return cls(note(message), empty_figure(message, height=TOPK_HEIGHT),
                   empty_figure(message, height=HEATMAP_HEIGHT), "", {}, gr.update(maximum=1, value=0))


class Details(NamedTuple):
    """Drawn right after :class:`Main` (further down the page)."""

    heatmap_avg: go.Figure
    grid: go.Figure
    lens: go.Figure

    @classmethod
    def blank(cls, message: str) -> "Details":
        return cls(empty_figure(message, height=HEATMAP_HEIGHT), empty_figure(message, height=GRID_HEIGHT),
                   empty_figure(message, height=LENS_HEIGHT))


class Heads(NamedTuple):
    """The block or head sliders moved."""

    heatmap: go.Figure
    heatmap_avg: go.Figure
    grid: go.Figure


class GenerateView(StepPictures):
    """The view's handlers, layout and wiring (how a step is drawn: :class:`StepPictures`)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.c: dict[str, Any] = {}

    # --------------------------------------------------------------- the session
    def session(self, v: Visitor, prompt: str | None) -> GenerationSession:
        """The visitor's session for this prompt: the current one, or a new one if the prompt
        changed or none exists yet. Call with ``v.lock`` held."""
        s = self.ctx.settings
        ids = prompt_ids(prompt, s)
        if v.session is None or v.session.prompt_ids != ids:
            model, enc = self.ctx.model(v), get_encoding()
            if model.cfg.vocab_size != enc.n_vocab:
                raise error(f"This model's vocab_size is {model.cfg.vocab_size:,}; generating with the GPT-2 "
                            f"tokenizer needs {enc.n_vocab:,}. Build a model with vocab_size {enc.n_vocab}.")
            if v.released:
                v.released = False
                gr.Warning("Your generation session was the longest idle and was released to make room for other "
                           "visitors: it starts again from the prompt.")
            v.session = GenerationSession(model, enc, ids, top_k=s.top_k, attn_window=s.attn_window)
            self.ctx.visitors.admit(v)
        return v.session

    def step_once(self, v: Visitor, prompt: str | None, settings: dict[str, Any] | None = None,
                  then: Callable[[], Any] | None = None) -> Any:
        """One token for the visitor (``v.lock`` held), greedy unless ``settings`` sample; warns once
        when cropping starts. ``then()``, if given, runs right after the step in the same turn on
        the model (drawing the view: see :mod:`gptviz.ui.serving`); its result is returned."""
        s = self.session(v, prompt)
        if settings is not None:
            sampling.apply(s, settings)
        limit = self.ctx.settings.max_session_tokens
        if len(s.ids) >= limit:
            raise error(f"This session has {len(s.ids):,} tokens; the limit is {limit:,}. "
                        "Press Reset to start again from the prompt.")
        drawn = self.ctx.steps.step(s, then)  # takes its turn on the model, batched with other visitors' Steps
        if s.steps[-1].cropped and (len(s.steps) == 1 or not s.steps[-2].cropped):
            ctx = s.model.cfg.context_length
            gr.Warning(f"The text is now longer than the model's context ({ctx} tokens): each step sees only the "
                       f"last {ctx} tokens, as the source's generate_text_simple crops.")
        return drawn

    # --------------------------------------------------------------- words and figures
    def candidates(self, prompt: str, temperature: Any, top_k: Any, top_p: Any, seed: Any,
                   request: gr.Request) -> go.Figure:
        """A sampling control moved: what the next step will draw from, before it is taken."""
        settings = sampling.settings_of(temperature, top_k, top_p, seed)
        v = self.ctx.visitor(request)
        with v.lock:
            s = self.session(v, prompt)
            sampling.apply(s, settings)
            d = s.next_distribution()
        what = "takes the most probable" if d.greedy else f"draws from {d.n_kept:,} tokens"
        return self._candidates_figure(d.candidates, f"Next step (not taken yet): the model {what}", None, d.n_kept,
                                       d.greedy)

    @staticmethod
    def viewed(s: GenerationSession, step: Any = None) -> int:
        """The step to show: ``step`` clamped into 0 … the number of steps (None: the newest)."""
        return len(s.steps) if step is None else index(step, len(s.steps) + 1)

    def main_view(self, v: Visitor, layer: Any, head: Any, step: Any = None) -> Main:
        """Every main output for step ``step`` (None: the newest, and the step selector moves to it)."""
        s = v.session
        cfg, k = s.model.cfg, self.viewed(s, step)
        layer, head = index(layer, cfg.n_layers), index(head, cfg.n_heads)
        selector = gr.Slider(maximum=max(1, len(s.steps)), value=k) if step is None else gr.skip()
        a = self._attention(s, layer, k, v.value_weighted)
        return Main(self._text_html(s, k), self._topk_figure(s, k), self._heatmap(a, head, s.model),
                    self._kv_readout(s, k), self.step_data(v, k), selector)

    # --------------------------------------------------------------- handlers (events)
    def step(self, prompt: str, layer: Any, head: Any, temperature: Any = 0, top_k: Any = 0, top_p: Any = 1,
             seed: Any = sampling.DEFAULT_SEED, request: gr.Request = None) -> Main:
        """One token: greedy (the source's argmax) unless the sampling settings say otherwise."""
        settings = sampling.settings_of(temperature, top_k, top_p, seed)
        v = self.ctx.visitor(request)
        with v.lock:
            view = self.step_once(v, prompt, settings, then=lambda: self.main_view(v, layer, head))
        self.ctx.ahead.want(v)  # the next step's read, while the model is idle
        return view

    def step_n(self, prompt: str, n: Any, layer: Any, head: Any, temperature: Any = 0, top_k: Any = 0,
               top_p: Any = 1, seed: Any = sampling.DEFAULT_SEED, request: gr.Request = None) -> Iterator[Main]:
        """N tokens, yielding the view after each (streamed to the browser)."""
        settings = sampling.settings_of(temperature, top_k, top_p, seed)
        try:
            count = int(n)
        except (TypeError, ValueError, OverflowError):
            raise error(f"Step ×N needs a whole number of steps, got {n!r}.") from None
        limit = self.ctx.settings.max_steps_per_click
        if not 1 <= count <= limit:
            raise error(f"Step ×N takes 1 to {limit} steps per click, got {count}.")
        v = self.ctx.visitor(request)
        for k in range(count):
            with v.lock:
                view = self.step_once(v, prompt, settings, then=lambda: self.main_view(v, layer, head))
            if k == count - 1:
                self.ctx.ahead.want(v)  # the next click's read, while the model is idle
            yield view

    def candidates_csv(self, step: Any, request: gr.Request) -> str | None:
        """The viewed step's candidates (id, piece, probability, drawn with, may be drawn) as a CSV file."""
        v = self.ctx.visitor(request)
        with v.lock:
            if v.session is None or not v.session.steps:
                raise error("Press Step first: the candidates belong to a step.")
            return self._candidates_csv(v.session, self.viewed(v.session, step), request.session_hash)

    def candidates_file(self, step: Any, request: gr.Request) -> gr.File:
        """The download box under the candidates: hidden until the first CSV, then holding it."""
        return gr.File(value=self.candidates_csv(step, request), visible=True)

    def undo(self, layer: Any, head: Any, request: gr.Request) -> Main:
        """Remove the last generated token (a warning, nothing else, at the start)."""
        v = self.ctx.visitor(request)
        with v.lock:
            if v.session is None or not v.session.steps:
                gr.Warning("Nothing to undo: only the prompt is left.")
                return skip(Main)
            v.session.undo()
            view = self.main_view(v, layer, head)
        self.ctx.ahead.want(v)
        return view

    def reset(self, prompt: str, layer: Any, head: Any, request: gr.Request) -> Main:
        """Back to the prompt (the prompt box's current text)."""
        v = self.ctx.visitor(request)
        with v.lock:
            s = self.session(v, prompt)
            s.reset()
            # drawn in a turn; a new session's prompt is read first, batched with other visitors' reads
            view = self.ctx.steps.read(s, then=lambda: self.main_view(v, layer, head))
        self.ctx.ahead.want(v)
        return view

    def details_view(self, v: Visitor, layer: Any, step: Any = None) -> Details:
        """(head average, all-heads grid, logit lens) of the visitor's session (``v.lock`` held)."""
        s = v.session
        k = self.viewed(s, step)
        return Details(*self._layer_figures(self._attention(s, index(layer, s.model.cfg.n_layers), k, v.value_weighted)),
                       self._lens_figure(s, k))

    def details(self, layer: Any, step: Any, request: gr.Request) -> Details:
        """(head average, all-heads grid, logit lens): drawn after the main view of each action."""
        v = self.ctx.visitor(request)
        with v.lock:
            return skip(Details) if v.session is None else self.details_view(v, layer, step)

    def view(self, step: Any, layer: Any, head: Any, request: gr.Request) -> Main:
        """The step selector moved: every view shows that step (a past one is recomputed: one forward)."""
        v = self.ctx.visitor(request)
        with v.lock:
            return skip(Main) if v.session is None else self.main_view(v, layer, head, step)

    def attention(self, layer: Any, head: Any, request: gr.Request, step: Any = None) -> Heads:
        """The chosen layer and head changed: (heatmap, head average, all-heads grid) of the viewed step."""
        v = self.ctx.visitor(request)
        with v.lock:
            s = v.session
            if s is None:
                return skip(Heads)
            cfg = s.model.cfg
            a = self._attention(s, index(layer, cfg.n_layers), self.viewed(s, step), v.value_weighted)
            return Heads(self._heatmap(a, index(head, cfg.n_heads), s.model), *self._layer_figures(a))

    def weighting(self, value_weighted: Any, layer: Any, head: Any, step: Any, request: gr.Request) -> Heads:
        """The value-weighted toggle: this visitor's heatmaps show ``weight × ‖value‖`` (renormalised
        per row) or the plain attention weights; a first-token sink whose value is near zero fades."""
        v = self.ctx.visitor(request)
        v.value_weighted = bool(value_weighted)
        return self.attention(layer, head, request, step)

    # --------------------------------------------------------------- layout and wiring
    def build(self) -> dict[str, Any]:
        s, c = self.ctx.settings, self.c
        cfg0 = self.ctx.default_spec.cfg
        n_layers, n_heads = (cfg0.n_layers, cfg0.n_heads) if cfg0 is not None else (12, 12)
        main, details = Main.blank(FIRST_MESSAGE), Details.blank(FIRST_MESSAGE)
        with gr.Row(equal_height=True):
            c["prompt"] = gr.Textbox(DEFAULT_PROMPT, label="Prompt", scale=4, elem_id="gen-prompt",
                                     info="editing the prompt starts a new session at the next Step")
            c["n_steps"] = Slider(1, s.max_steps_per_click, value=8, step=1, label="N for Step ×N", scale=2,
                                     elem_id="stepn-count")
            c["view_step"] = Slider(0, 1, value=0, step=1, label="Viewing step (0 = the prompt)", scale=2,
                                       elem_id="view-step", info="go back to any past step: every view follows")
        with gr.Row():
            c["step_btn"] = gr.Button("Step", variant="primary", elem_id="step-btn")
            c["stepn_btn"] = gr.Button("Step ×N", elem_id="stepn-btn")
            c["undo_btn"] = gr.Button("Undo", elem_id="undo-btn")
            c["reset_btn"] = gr.Button("Reset", elem_id="reset-btn")
        self.sampling_inputs = sampling.build(c)
        with gr.Row():
            with gr.Column(scale=3):
                preview = chips_html(encode(DEFAULT_PROMPT), limit=s.max_chips) + \
                    '<div class="legend">the prompt, as tokens · press Step to generate the next one</div>'
                c["gen_text"] = gr.HTML(preview, elem_id="gen-text", padding=True, min_height=120)
                c["kv"] = gr.Markdown(main.kv, elem_id="kv-readout")
            with gr.Column(scale=2):
                c["topk"] = DirectPlot(main.topk, show_label=False, elem_id="topk-plot")
                with gr.Row():  # made on demand: writing a file at every Step costs ~50 ms of it
                    c["cand_csv_btn"] = gr.Button("⬇ candidates as CSV", size="sm", scale=0, min_width=200,
                                                  elem_id="candidates-csv-btn")
                    c["cand_csv"] = gr.File(show_label=False, interactive=False, height=60, elem_id="candidates-csv",
                                             visible=False)  # shown with the first file: no empty box before
        with gr.Row():
            c["layer"] = Slider(0, max(1, n_layers - 1), value=0, step=1, label="Block (layer)",
                                   elem_id="layer-slider")
            c["head"] = Slider(0, max(1, n_heads - 1), value=0, step=1, label="Head", elem_id="head-slider")
            c["value_weighted"] = Checkbox(False, label="value-weighted", scale=0, min_width=170,
                                              elem_id="value-weighted",
                                              info="weight × ‖value‖: what each key really adds")
        with gr.Row():
            c["heatmap"] = DirectPlot(main.heatmap, show_label=False, elem_id="heatmap")
            c["heatmap_avg"] = DirectPlot(details.heatmap_avg, show_label=False, elem_id="heatmap-avg")
        c["grid"] = DirectPlot(details.grid, show_label=False, elem_id="heads-grid")
        c["lens"] = DirectPlot(details.lens, show_label=False, elem_id="lens-plot")
        with gr.Accordion("Raw data of the last step (what the step API returns)", open=False,
                          elem_id="step-json-acc"):
            c["step_json"] = gr.JSON(main.step_json, elem_id="step-json", show_label=False)
        return c

    def wire(self) -> None:
        c, ctx = self.c, self.ctx
        main, event, knobs = components(Main, c), ctx.model_event, self.sampling_inputs
        # Step, Step ×N and Reset take their turns on the model inside: ctx.steps batches the Steps
        # (and new prompts' reads) of visitors who press at once, and the batch's leader draws
        # their views in its turn.
        # Every other model event runs in a turn of its own (ctx.turns).
        after = dict(fn=ctx.turns(self.details), inputs=[c["layer"], c["view_step"]], outputs=components(Details, c),
                     api_visibility="private", **event)
        #: The actions' follow-up events (for the page: remember the session after each).
        self.actions = [
            c["step_btn"].click(self.step, [c["prompt"], c["layer"], c["head"], *knobs], main,
                                api_name="step", **event).success(**after),
            c["stepn_btn"].click(self.step_n, [c["prompt"], c["n_steps"], c["layer"], c["head"], *knobs],
                                 main, api_name="step_n", **event).success(**after),
            c["undo_btn"].click(ctx.turns(self.undo), [c["layer"], c["head"]], main, api_name="undo",
                                **event).success(**after),
            c["reset_btn"].click(self.reset, [c["prompt"], c["layer"], c["head"]], main, api_name="reset",
                                 **event).success(**after),
        ]
        gr.on([k.input for k in knobs], ctx.turns(self.candidates), [c["prompt"], *knobs], c["topk"],
              api_name="candidates", trigger_mode="always_last", **event)
        gr.on([c["layer"].input, c["head"].input], ctx.turns(self.attention), [c["layer"], c["head"], c["view_step"]],
              components(Heads, c), api_name="attention", trigger_mode="always_last", **event)
        c["value_weighted"].input(ctx.turns(self.weighting), [c["value_weighted"], c["layer"], c["head"], c["view_step"]],
                                  components(Heads, c), api_name="value_weighted", **event)
        c["cand_csv_btn"].click(self.candidates_file, c["view_step"], c["cand_csv"], api_name="candidates_csv",
                                show_progress="hidden")
        c["view_step"].input(ctx.turns(self.view), [c["view_step"], c["layer"], c["head"]], main, api_name="view_step",
                             trigger_mode="always_last", **event).success(**after)
