"""For teachers: links that reopen an exact view, a session that survives a reload, and the
walk-through as a standalone HTML report or a lesson file that replays.

* On page load, the URL's query parameters (:mod:`gptviz.ui.links`) — or, without any, what
  this browser last had (``gr.BrowserState``: prompt, generated ids, block, head, model choice;
  ids and settings only, never tensors) — are applied: the tab chosen, the steps run (one turn
  on the model per step), the sliders set, the figures drawn.
* "Copy link to this view" in every tab puts the URL of the tab's current state in a box
  (and on the clipboard where the browser allows).
* ``/export_report``, ``/export_lesson``, ``/open_lesson``: the session as a file, and back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import gradio as gr

from ..config import CONFIG_FIELDS, PRESETS, GPTConfig, config_from_fields
from ..files.lesson import LessonError, hub_source, lesson_from_session, lesson_to_json, load_lesson, random_source, replay
from ..files.report import session_report_html
from ..files.weights import is_allowed_name
from ..settings import DTYPES, RANDOM, SEED
from ..tokenizer import encode
from . import sampling
from .generate import DEFAULT_PROMPT, Details, GenerateView, Main
from .inputs import check_text, index
from .links import View, link_query, parse_link
from .model import ModelView
from .outputs import components, skip
from .parameters import Counted, ParametersView
from .serving import AppContext, ModelSpec, Visitor, error
from .tokenizer import Tokenized, TokenizerView

STORAGE_KEY = "gptviz-session"
#: What a reload restores at most (each generated token is stepped again, one turn each).
MAX_RESTORE_STEPS = 256
COPY_JS = ("(q) => { if (!q || !q.startsWith('?')) return q; const url = location.origin + location.pathname + q; "
           "try { navigator.clipboard.writeText(url); } catch (e) {} return url; }")

#: Everything a link can set, in one response.
Opened = NamedTuple("Opened", [("tabs", Any), ("tok_in", Any), *Tokenized.__annotations__.items(), ("prompt", Any),
                               ("layer", Any), ("head", Any), ("temperature", Any), ("top_k", Any), ("top_p", Any),
                               ("seed", Any), *Main.__annotations__.items(),
                               *Details.__annotations__.items(), ("preset_dd", Any),
                               *[(f"cfg_{f}", Any) for f in CONFIG_FIELDS],
                               *[(f, Any) for f in Counted._fields if f != "preset_dd"], ("heads_box", Any),
                               ("card", Any)])


class Exported(NamedTuple):
    export_file: str


class ShareView:
    """The page-level events that span views: needs the views it fills."""

    def __init__(self, ctx: AppContext, tokenizer: TokenizerView, generate: GenerateView, model: ModelView) -> None:
        self.ctx, self.tokenizer, self.generate, self.model = ctx, tokenizer, generate, model
        self.c: dict[str, Any] = {}
        self.files = Path(tempfile.mkdtemp(prefix="gptviz-exports-"))

    # --------------------------------------------------------------- opening a view
    def _switch(self, v: Visitor, view: View) -> None:
        """Use the link's model when it names one this app offers (a failure warns and keeps the current)."""
        if view.weights is None and view.dtype is None:
            return
        weights = view.weights or (v.spec.source if v.spec.source == RANDOM or is_allowed_name(v.spec.source)
                                   else RANDOM)
        dtype = view.dtype or v.spec.dtype
        spec = ModelSpec(RANDOM, PRESETS["seed-124M"], dtype) if weights == RANDOM else ModelSpec(weights, None, dtype)
        if spec == v.spec:
            return
        size = spec.weight_bytes()
        if size is not None and size > self.ctx.settings.max_model_bytes:
            gr.Warning(f"{spec.label} is larger than this app allows: the current model stays.")
            return
        try:
            self.ctx.model(Visitor(spec), asker=v, replace=False)  # on failure, the current model stays
        except gr.Error as e:
            gr.Warning(f"{e.message} The current model stays.")
            return
        v.spec, v.session, v.own = spec, None, None

    def open_view(self, saved: Any, request: gr.Request) -> Iterator[Opened]:
        """On page load: the link's view, else this browser's last session, else nothing to do."""
        params = dict(request.query_params) if request is not None and request.query_params else {}
        params.pop("__theme", None)
        view = parse_link(params, self.ctx.settings) if params else self._saved_view(saved)
        for warning in view.warnings:
            gr.Warning(warning)
        if view.empty:
            yield skip(Opened)
            return
        out = skip(Opened)._asdict()
        if view.tab:
            out["tabs"] = gr.Tabs(selected=view.tab)
        if view.text is not None:
            out.update(tok_in=view.text, **self.tokenizer.tokenize(view.text)._asdict())
        if view.preset or view.config:
            cfg = view.config or PRESETS[view.preset]
            out.update(ParametersView.counted(cfg)._asdict(), **{f"cfg_{f}": getattr(cfg, f) for f in CONFIG_FIELDS})
        if view.heads is not None:
            out["heads_box"] = check_text(view.heads, "list of heads", self.ctx.settings)
        v = self.ctx.visitor(request)
        self._switch(v, view)
        out["card"] = self.model.card(v)
        if view.prompt is not None or view.steps:
            yield from self._run(v, view, out)
        yield Opened(**out)

    def _run(self, v: Visitor, view: View, out: dict[str, Any]) -> Iterator[Opened]:
        """The link's steps, one turn each (yielding nothing to redraw in between), then its view."""
        prompt = view.prompt if view.prompt is not None else DEFAULT_PROMPT
        out["prompt"] = prompt
        knobs = dict(temperature=view.temperature or 0.0, top_k=view.top_k or 0,
                     top_p=1.0 if view.top_p is None else view.top_p, seed=sampling.DEFAULT_SEED if view.seed is None
                     else view.seed)
        settings = sampling.settings_of(**knobs)
        out.update(knobs)  # the sliders show what the steps used
        with v.lock:
            s = self.generate.session(v, prompt)
            s.reset()
        for _ in range(view.steps):
            yield skip(Opened)
            with v.lock:
                self.generate.step_once(v, prompt, settings)
        with v.lock:
            cfg = v.session.model.cfg
            layer, head = view.layer or 0, view.head or 0
            if layer >= cfg.n_layers or head >= cfg.n_heads:
                gr.Warning(f"The link asks for block {layer}, head {head}; this model has {cfg.n_layers} blocks of "
                           f"{cfg.n_heads} heads: block 0, head 0 is shown.")
                layer, head = 0, 0
            if view.expected_ids is not None and v.session.ids != view.expected_ids:
                gr.Warning("This browser's last session gave other tokens with today's model: the steps were "
                           "run again from its prompt.")
            out.update(layer=gr.Slider(maximum=max(1, cfg.n_layers - 1), value=layer),
                       head=gr.Slider(maximum=max(1, cfg.n_heads - 1), value=head),
                       **self.generate.main_view(v, layer, head)._asdict(),
                       **self.generate.details_view(v, layer)._asdict())

    def _saved_view(self, saved: Any) -> View:
        """The view this browser last had, from its BrowserState (checked like a link)."""
        if not isinstance(saved, dict) or not isinstance(saved.get("prompt"), str):
            return View()
        params = {k: str(saved[k]) for k in ("prompt", "layer", "head", "weights", "dtype", "temperature", "top_k",
                                             "top_p", "seed") if saved.get(k) is not None}
        generated = saved.get("generated")
        ids = [i for i in generated if isinstance(i, int)] if isinstance(generated, list) else []
        view = parse_link(params, self.ctx.settings)
        view.steps = min(len(ids), MAX_RESTORE_STEPS)
        view.warnings = [w for w in view.warnings if "Unknown" not in w]
        view.expected_ids = encode(view.prompt or "") + ids[: view.steps]
        return view

    def remember(self, layer: Any, head: Any, request: gr.Request) -> dict[str, Any] | Any:
        """What a reload restores (ids and settings only), after each action."""
        v = self.ctx.visitor(request)
        with v.lock:
            s = v.session
            if s is None:
                return gr.skip()
            shareable = v.spec.source == RANDOM and v.spec.cfg == PRESETS["seed-124M"] or is_allowed_name(v.spec.source)
            knobs = s.sampling
            return dict(prompt=s.prompt_text, generated=s.generated_ids, layer=index(layer, s.model.cfg.n_layers),
                        head=index(head, s.model.cfg.n_heads), weights=v.spec.source if shareable else None,
                        dtype=v.spec.dtype if shareable else None, temperature=knobs["temperature"],
                        top_k=knobs["sample_top_k"], top_p=knobs["top_p"], seed=knobs["seed"])

    # --------------------------------------------------------------- links to the current view
    def generate_link(self, prompt: str, layer: Any, head: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any,
                      request: gr.Request) -> str:
        v = self.ctx.visitor(request)
        with v.lock:
            steps = len(v.session.steps) if v.session is not None and v.session.prompt_text == prompt else 0
        view = View(tab="generate", prompt=prompt, steps=min(steps, 64), layer=int(layer or 0), head=int(head or 0))
        knobs = sampling.settings_of(temperature, top_k, top_p, seed)
        if knobs["temperature"] > 0:  # greedy links stay short
            view.temperature, view.top_k, view.seed = knobs["temperature"], knobs["sample_top_k"], knobs["seed"]
            view.top_p = knobs["top_p"]
        self._model_in(view, v)
        return link_query(view)

    def _model_in(self, view: View, v: Visitor) -> None:
        if v.spec.source == RANDOM and v.spec.cfg == PRESETS["seed-124M"] or is_allowed_name(v.spec.source):
            if v.spec.source != self.ctx.default_spec.source or v.spec.dtype != self.ctx.default_spec.dtype:
                view.weights, view.dtype = v.spec.source, v.spec.dtype

    @staticmethod
    def tokenizer_link(text: str) -> str:
        return link_query(View(tab="tokenizer", text=text))

    @staticmethod
    def parameters_link(*fields: Any) -> str:
        try:
            cfg = config_from_fields(*fields)
        except ValueError as e:
            raise error(f"Invalid configuration: {e}.") from None
        name = next((n for n, c in PRESETS.items() if c == cfg), None)
        return link_query(View(tab="parameters", preset=name, config=None if name else cfg))

    def inside_link(self, prompt: str, heads: str, request: gr.Request) -> str:
        v = self.ctx.visitor(request)
        with v.lock:
            steps = len(v.session.steps) if v.session is not None and v.session.prompt_text == prompt else 0
        view = View(tab="inside", prompt=prompt, steps=min(steps, 64), heads=heads)
        self._model_in(view, v)
        return link_query(view)

    def model_link(self, weights: str, dtype: str) -> str:
        return link_query(View(tab="model", weights=weights if weights in (RANDOM, *filter(is_allowed_name, [weights]))
                               else None, dtype=dtype if dtype in DTYPES else None))

    # --------------------------------------------------------------- files
    def _session(self, request: gr.Request) -> tuple[Visitor, Any]:
        v = self.ctx.visitor(request)
        if v.session is None or not v.session.steps:
            raise error("Press Step on the Generate tab first: there is no walk-through to export yet.")
        return v, v.session

    def _file(self, request: gr.Request, name: str, text: str) -> str:
        folder = self.files / (getattr(request, "session_hash", None) or "anonymous")[:64]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    def export_report(self, layer: Any, head: Any, request: gr.Request) -> str:
        """The walk-through as one standalone HTML file (works offline, plotly embedded)."""
        v, s = self._session(request)
        with v.lock:
            cfg = s.model.cfg
            html = session_report_html(s, layer=index(layer, cfg.n_layers), head=index(head, cfg.n_heads),
                                       model_label=v.spec.label)
        return self._file(request, "gptviz-report.html", html)

    def export_lesson(self, layer: Any, head: Any, request: gr.Request) -> str:
        """The walk-through as a lesson file that :func:`gptviz.files.lesson.replay` turns back into a session."""
        v, s = self._session(request)
        with v.lock:
            cfg = s.model.cfg
            if v.spec.source == RANDOM:
                source = random_source(cfg, SEED)
            elif is_allowed_name(v.spec.source):
                source = hub_source(v.spec.source, cfg)
            else:
                raise error("Lessons name their model; this one (an upload or the operator's checkpoint) cannot be "
                            "named in a file others open.")
            lesson = lesson_from_session(s, model_source=source, dtype=v.spec.dtype,
                                         views=dict(tab="generate", layer=index(layer, cfg.n_layers),
                                                    head=index(head, cfg.n_heads), step=len(s.steps)))
        return self._file(request, "gptviz-lesson.json", lesson_to_json(lesson))

    def open_lesson(self, file: Any, request: gr.Request) -> Iterator[Opened]:
        """A lesson file uploaded: its model (random or allowed), its steps replayed and verified."""
        if not file:
            raise error("Choose a lesson file (.json) first.")
        try:
            lesson = load_lesson(Path(getattr(file, "name", file)), max_model_bytes=self.ctx.settings.max_model_bytes)
        except LessonError as e:
            raise error(f"This lesson file cannot be opened: {e}") from None
        source = lesson["model"]
        if source["kind"] == "random" and source.get("seed") == SEED:
            spec = ModelSpec(RANDOM, GPTConfig.from_dict(source["config"]), lesson["dtype"])
        elif source["kind"] == "hub" and is_allowed_name(source.get("name")):
            spec = ModelSpec(source["name"], None, lesson["dtype"])
        else:
            raise error("This lesson was made with a model this app cannot open (a custom checkpoint or another "
                        "seed).")
        v = self.ctx.visitor(request)
        model = self.ctx.model(Visitor(spec), asker=v)  # the lesson replaces the visitor's model
        yield skip(Opened)
        with v.lock:
            result = replay(lesson, model, top_k=self.ctx.settings.top_k, attn_window=self.ctx.settings.attn_window)
            v.spec, v.own, v.session = spec, None, result.session
            self.ctx.visitors.admit(v)
        if not result.ok:
            gr.Warning(result.message)
        views = lesson.get("views") or {}
        out = skip(Opened)._asdict()
        cfg = model.cfg
        layer, head = index(views.get("layer", 0), cfg.n_layers), index(views.get("head", 0), cfg.n_heads)
        with v.lock:
            out.update(tabs=gr.Tabs(selected="generate"), prompt=result.session.prompt_text, card=self.model.card(v),
                       layer=gr.Slider(maximum=max(1, cfg.n_layers - 1), value=layer),
                       head=gr.Slider(maximum=max(1, cfg.n_heads - 1), value=head),
                       **self.generate.main_view(v, layer, head)._asdict(),
                       **self.generate.details_view(v, layer)._asdict())
        yield Opened(**out)

    # --------------------------------------------------------------- layout and wiring
    def link_row(self, tab: str) -> None:
        """A "Copy link to this view" button and the box its URL appears in (inside ``tab``)."""
        with gr.Row(elem_classes="link-row"):
            self.c[f"{tab}_link_btn"] = gr.Button("Copy link to this view", size="sm", scale=0, min_width=200,
                                                  elem_id=f"{tab}-link-btn")
            self.c[f"{tab}_link"] = gr.Textbox(show_label=False, placeholder="a link that reopens this view",
                                               interactive=False, buttons=["copy"], scale=4, container=False,
                                               elem_id=f"{tab}-link")

    def files_row(self) -> None:
        """Report and lesson downloads, and opening a lesson (inside the Generate tab)."""
        c = self.c
        with gr.Accordion("Export this walk-through, or open a lesson", open=False, elem_id="export-acc"):
            with gr.Row():
                c["report_btn"] = gr.Button("Report (standalone HTML)", size="sm", elem_id="report-btn")
                c["lesson_btn"] = gr.Button("Lesson file (JSON)", size="sm", elem_id="lesson-btn")
                c["export_file"] = gr.File(label="download", interactive=False, elem_id="export-file", scale=2)
            with gr.Row():
                c["lesson_file"] = gr.File(label="open a lesson file", file_types=[".json"], type="filepath",
                                           elem_id="lesson-file", scale=3)
                c["open_btn"] = gr.Button("Open lesson", size="sm", elem_id="open-lesson-btn", scale=1)

    def build_state(self) -> None:
        self.c["saved"] = gr.BrowserState(None, storage_key=STORAGE_KEY)

    def wire(self, demo: gr.Blocks, tabs: gr.Tabs, views: dict[str, dict[str, Any]], after_actions: list[Any]) -> None:
        """``views``: every view's components by name; ``after_actions``: the Generate view's events
        after which the session is remembered in the browser."""
        c, ctx = self.c, self.ctx
        every = {"tabs": tabs, **{k: v for comps in views.values() for k, v in comps.items()}}
        opened = components(Opened, every)
        demo.load(ctx.turns(self.open_view), c["saved"], opened, api_visibility="private", show_progress="hidden")
        g, t, p, i, m = (views[k] for k in ("generate", "tokenizer", "parameters", "inside", "model"))
        for event in after_actions:
            event.then(self.remember, [g["layer"], g["head"]], c["saved"], api_visibility="private",
                       show_progress="hidden")
        links = {
            "generate": (self.generate_link, [g["prompt"], g["layer"], g["head"], g["temperature"], g["top_k"],
                                              g["top_p"], g["seed"]]),
            "tokenizer": (self.tokenizer_link, [t["tok_in"]]),
            "parameters": (self.parameters_link, [p[f"cfg_{f}"] for f in CONFIG_FIELDS]),
            "inside": (self.inside_link, [g["prompt"], i["heads_box"]]),
            "model": (self.model_link, [m["weights"], m["dtype"]]),
        }
        for tab, (fn, inputs) in links.items():
            box = c[f"{tab}_link"]
            c[f"{tab}_link_btn"].click(fn, inputs, box, api_visibility="private", show_progress="hidden").then(
                None, box, box, js=COPY_JS)
        event = ctx.model_event
        c["report_btn"].click(ctx.turns(self.export_report), [g["layer"], g["head"]], c["export_file"],
                              api_name="export_report", **event)
        c["lesson_btn"].click(self.export_lesson, [g["layer"], g["head"]], c["export_file"], api_name="export_lesson",
                              show_progress="hidden")
        c["open_btn"].click(ctx.turns(self.open_lesson), c["lesson_file"], opened, api_name="open_lesson", **event)
