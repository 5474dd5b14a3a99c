"""The Generate view: step through greedy generation one token at a time, with the candidates,
the KV-cache readout, attention heatmaps of any block and head, and the logit lens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import torch

from .. import plots
from ..formatting import nbytes, percent
from ..generation import GenerationSession
from ..params import kv_bytes_per_token
from ..tokenizer import encode, get_encoding, label
from .components import Plot, csv_button, csv_file
from .html import chips_html, esc, md_code, note
from .inputs import index, prompt_ids
from .outputs import components, skip
from . import sampling
from .serving import AppContext, Visitor, error

DEFAULT_PROMPT = "Hello, I am"
HEATMAP_HEIGHT, GRID_HEIGHT, TOPK_HEIGHT, LENS_HEIGHT = 520, 720, 380, 500
FIRST_MESSAGE = "Press Step to generate the next token"


class Main(NamedTuple):
    """What every action (Step, Step ×N, Undo, Reset) redraws at once."""

    gen_text: str
    topk: go.Figure
    heatmap: go.Figure
    kv: str
    step_json: dict
    view_step: Any  # the step selector: after an action, at the newest step
    cand_csv: str | None  # the viewed step's candidates as CSV

    @classmethod
    def blank(cls, message: str) -> "Main":
        return cls(note(message), plots.empty_figure(message, height=TOPK_HEIGHT),
                   plots.empty_figure(message, height=HEATMAP_HEIGHT), "", {}, gr.Slider(maximum=1, value=0), None)


class Details(NamedTuple):
    """Drawn right after :class:`Main` (further down the page)."""

    heatmap_avg: go.Figure
    grid: go.Figure
    lens: go.Figure

    @classmethod
    def blank(cls, message: str) -> "Details":
        return cls(plots.empty_figure(message, height=HEATMAP_HEIGHT), plots.empty_figure(message, height=GRID_HEIGHT),
                   plots.empty_figure(message, height=LENS_HEIGHT))


class Heads(NamedTuple):
    """The block or head sliders moved."""

    heatmap: go.Figure
    heatmap_avg: go.Figure
    grid: go.Figure


@dataclass(frozen=True)
class _Attention:
    """One layer's attention over the displayed window, ready to plot."""

    layer: int
    weights: torch.Tensor  # (n_heads, W, W), row = query, column = key
    positions: list[int]  # absolute positions of the W tokens
    labels: list[str]  # their display pieces
    span: str  # "tokens 0–14", for titles


def _lens_height(n_layers: int) -> int:
    """Room for two lines of text per block (taller for the larger GPT-2s)."""
    return max(LENS_HEIGHT, 170 + 28 * n_layers)


class GenerateView:
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

    def step_once(self, v: Visitor, prompt: str | None, settings: dict[str, Any] | None = None) -> None:
        """One token for the visitor (``v.lock`` held), greedy unless ``settings`` sample; warns once
        when cropping starts."""
        s = self.session(v, prompt)
        if settings is not None:
            sampling.apply(s, settings)
        limit = self.ctx.settings.max_session_tokens
        if len(s.ids) >= limit:
            raise error(f"This session has {len(s.ids):,} tokens; the limit is {limit:,}. "
                        "Press Reset to start again from the prompt.")
        self.ctx.steps.step(s)  # takes its turn on the model, batched with other visitors' Steps
        if s.steps[-1].cropped and (len(s.steps) == 1 or not s.steps[-2].cropped):
            ctx = s.model.cfg.context_length
            gr.Warning(f"The text is now longer than the model's context ({ctx} tokens): each step sees only the "
                       f"last {ctx} tokens, as the source's generate_text_simple crops.")

    # --------------------------------------------------------------- words and figures
    def _text_html(self, s: GenerationSession, k: int) -> str:
        """The growing text: prompt chips, then generated chips (step ``k``'s token outlined)."""
        ids, n_prompt, ctx = s.ids, len(s.prompt_ids), s.model.cfg.context_length
        legend = (f'<div class="legend"><span class="chip">prompt</span> <span class="chip gen">generated</span> '
                  f"&nbsp;{n_prompt} prompt + {len(s.steps)} generated tokens")
        if len(ids) > ctx:
            legend += f" · dimmed tokens lie outside the model's context of {ctx}"
        sampled = {r.position for r in s.steps if r.sampled}
        if sampled:
            legend += f" · {len(sampled)} sampled (dashed)"
        if k < len(s.steps):
            legend += f" · viewing step {k} of {len(s.steps)}"
        chips = chips_html(ids, limit=self.ctx.settings.max_chips, generated_from=n_prompt,
                           unseen_before=max(0, len(ids) - ctx), sampled=sampled,
                           highlight=s.steps[k - 1].position if k else None)
        return chips + legend + "</div>"

    @staticmethod
    def _this_step(s: GenerationSession, k: int) -> str:
        """Step ``k`` in words: what it read and chose, the runner-up, and from which block on
        the logit lens already predicts the choice (Markdown)."""
        r = s.steps[k - 1]
        chosen = next((c for c in r.candidates if c.token_id == r.token_id), None)
        text = f"**Step {k}** read {r.context_len} tokens and chose {md_code(label(r.token_id))}"
        if chosen is not None:
            text += f" (p = {percent(chosen.prob)})"
        runner_up = next((c for c in r.candidates if c.token_id != r.token_id), None)
        if runner_up is not None:
            text += f", ahead of {md_code(label(runner_up.token_id))} ({percent(runner_up.prob)})"
        if r.lens:
            first = len(r.lens)
            while first > 0 and r.lens[first - 1].token_id == r.token_id:
                first -= 1
            last = len(r.lens) - 1
            text += (". Logit lens: every block already predicts it" if first == 0 else
                     ". Logit lens: only the last block predicts it" if first >= last else
                     f". Logit lens: blocks {first}–{last} predict it")
        return text + "."

    def _kv_readout(self, s: GenerationSession, k: int) -> str:
        """What the KV cache holds and the work step ``k`` saved."""
        cfg, size = s.model.cfg, s.model.dtype.itemsize
        per_token = kv_bytes_per_token(cfg, size)
        formula = (f"2 (K, V) × {cfg.n_layers} blocks × {cfg.n_heads} heads × {cfg.head_dim} dims × {size} B "
                   f"= {per_token:,} B per token")
        if not k and s.cache_tokens:  # back at the prompt after Reset: the prompt's keys and values stay
            return (f"**KV cache:** {s.cache_tokens:,} prompt tokens cached = {nbytes(s.cache_tokens * per_token)}; "
                    f"the next Step reuses them.  \n{formula}")
        if not k:
            return (f"**KV cache:** empty. The first Step runs the {len(s.ids)} prompt tokens through the model "
                    f"(a prefill) and keeps their keys and values; every later Step computes 1 position.  \n{formula}")
        r = s.steps[k - 1]
        if r.positions_computed < r.context_len:
            plural = "s" if r.positions_computed > 1 else ""
            work = (f"**This step computed {r.positions_computed} position{plural} instead of {r.context_len}**: "
                    f"the other {r.context_len - r.positions_computed} came from the cache.")
        elif r.cropped:
            work = (f"**This step computed all {r.positions_computed} positions**: the text overflows the context, "
                    "cropping shifts every position, so cached keys and values no longer fit (the source recomputes "
                    "every step).")
        else:
            work = (f"**This step computed all {r.positions_computed} positions** (a prefill: there was no cache to "
                    "reuse).")
        return (f"{self._this_step(s, k)}\n\n"
                f"**KV cache:** {r.cache_tokens:,} tokens cached = {nbytes(r.cache_tokens * per_token)} of keys "
                f"and values ({nbytes(r.cache_bytes)} allocated, grown in chunks) · {formula}  \n"
                f"{work} Step time {r.ms:.0f} ms. The Inside tab shows the cache layer by layer.")

    @staticmethod
    def _candidates_figure(candidates: list, title: str, chosen: int | None, n_kept: int, greedy: bool) -> go.Figure:
        enc = get_encoding()
        pieces, ids = [label(c.token_id, enc, 20) for c in candidates], [c.token_id for c in candidates]
        probs = [c.prob for c in candidates]
        if greedy:
            return plots.topk_figure(pieces, probs, ids, chosen=0 if chosen is None else chosen, height=TOPK_HEIGHT,
                                     title=title)
        return plots.sampling_figure(pieces, probs, [c.sample_prob or 0.0 for c in candidates],
                                     [bool(c.kept) for c in candidates], ids, chosen=chosen, n_kept=n_kept,
                                     height=TOPK_HEIGHT, title=title)

    def _topk_figure(self, s: GenerationSession, k: int) -> go.Figure:
        if not k:
            return plots.empty_figure("Press Step to see the next-token candidates", height=TOPK_HEIGHT)
        r, enc = s.steps[k - 1], get_encoding()
        read = label(s.ids[r.position - 1], enc, 20)
        how = f"draws “{label(r.token_id, enc, 20)}” (sampled, T={r.temperature:g})" if r.sampled else \
            f"picks “{label(r.token_id, enc, 20)}”"
        chosen = next((k for k, c in enumerate(r.candidates) if c.token_id == r.token_id), None)
        return self._candidates_figure(r.candidates, f"Step {k}: after “{read}” the model {how}", chosen,
                                       r.n_kept, not r.sampled)

    def candidates(self, prompt: str, temperature: Any, top_k: Any, top_p: Any, seed: Any,
                   request: gr.Request) -> go.Figure:
        """A sampling control moved: what the next step will draw from, before it is taken."""
        settings = sampling.settings_of(temperature, top_k, top_p, seed)
        v = self.ctx.visitor(request)
        with v.lock:
            s = self.session(v, prompt)
            sampling.apply(s, settings)
            d = s.next_distribution()
        what = "takes the most probable" if d.greedy else f"draws from {d.n_kept:,} tokens ({percent(d.kept_mass)} " \
            "of the model's probability)"
        return self._candidates_figure(d.candidates, f"Next step (not taken yet): the model {what}", None, d.n_kept,
                                       d.greedy)

    def _attention(self, s: GenerationSession, layer: int, k: int) -> _Attention:
        window = self.ctx.settings.attn_window
        weights, positions = s.attention_at(k, layer, window) if k else s.attention(layer, window)
        span = f"tokens {positions[0]}–{positions[-1]}" + (f" (last {len(positions)})" if positions[0] > 0 else "")
        span += f", read by step {k}" if k else ", the prompt"
        return _Attention(layer, weights.float().cpu(), positions, [label(s.ids[p]) for p in positions], span)

    @staticmethod
    def _heatmap(a: _Attention, head: int) -> go.Figure:
        return plots.attention_figure(a.weights[head], a.labels, a.positions, height=HEATMAP_HEIGHT,
                                      title=f"Block {a.layer}, head {head} · {a.span}")

    @staticmethod
    def _layer_figures(a: _Attention) -> tuple[go.Figure, go.Figure]:
        """(head average, all-heads grid) of one layer."""
        n_heads = a.weights.shape[0]
        avg = plots.attention_figure(a.weights.mean(0), a.labels, a.positions, height=HEATMAP_HEIGHT,
                                     title=f"Block {a.layer}, average of {n_heads} heads · {a.span}")
        grid = plots.attention_grid_figure(a.weights, a.labels, a.positions, height=GRID_HEIGHT,
                                           title=f"Block {a.layer}: all {n_heads} heads · {a.span}")
        return avg, grid

    def _lens_figure(self, s: GenerationSession, k: int) -> go.Figure:
        if not k:
            return plots.empty_figure("Press Step to see what every block would predict (logit lens)",
                                      height=LENS_HEIGHT)
        enc = get_encoding()
        first = max(0, k - self.ctx.settings.lens_steps)
        steps = s.steps[first:k]
        read = [label(s.ids[r.position - 1], enc, 10) for r in steps]
        return plots.logit_lens_figure(
            [[label(e.token_id, enc, 24) for e in r.lens] for r in steps], [[e.prob for e in r.lens] for r in steps],
            read, height=_lens_height(len(steps[-1].lens)),
            title=f"Logit lens: each block's top-1 next token, steps {first + 1}–{k}",
        )

    @staticmethod
    def step_data(v: Visitor, k: int | None = None) -> dict:
        """Everything step ``k`` (default: the newest) produced, as plain data (the API's view of the session)."""
        s = v.session
        k = len(s.steps) if k is None else k
        data: dict[str, Any] = dict(model=v.spec.label, ids=s.ids, prompt_tokens=len(s.prompt_ids), text=s.text,
                                    steps=len(s.steps), viewing=k)
        if k:
            r = s.steps[k - 1]
            data["last_step"] = dict(
                token_id=r.token_id, piece=r.piece, cropped=r.cropped, context_len=r.context_len,
                positions_computed=r.positions_computed, cache_tokens=r.cache_tokens, cache_bytes=r.cache_bytes,
                ms=round(r.ms, 2), candidates=[[c.token_id, c.piece, round(c.prob, 6)] for c in r.candidates],
                sampled=r.sampled, temperature=r.temperature, top_k=r.sample_top_k, top_p=r.top_p, seed=r.seed,
                lens=[[e.layer, e.token_id, e.piece, round(e.prob, 6)] for e in r.lens],
            )
        return data

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
        return Main(self._text_html(s, k), self._topk_figure(s, k), self._heatmap(self._attention(s, layer, k), head),
                    self._kv_readout(s, k), self.step_data(v, k), selector, self._candidates_csv(s, k))

    @staticmethod
    def _candidates_csv(s: GenerationSession, k: int) -> str | None:
        if not k:
            return None
        r = s.steps[k - 1]
        table = pd.DataFrame([dict(rank=n + 1, id=c.token_id, piece=c.piece, probability=c.prob,
                                   drawn_with=c.sample_prob, may_be_drawn=c.kept, chosen=c.token_id == r.token_id)
                              for n, c in enumerate(r.candidates)])
        return csv_file(table, f"candidates-step-{k}", str(id(s)))

    # --------------------------------------------------------------- handlers (events)
    def step(self, prompt: str, layer: Any, head: Any, temperature: Any = 0, top_k: Any = 0, top_p: Any = 1,
             seed: Any = sampling.DEFAULT_SEED, request: gr.Request = None) -> Main:
        """One token: greedy (the source's argmax) unless the sampling settings say otherwise."""
        settings = sampling.settings_of(temperature, top_k, top_p, seed)
        v = self.ctx.visitor(request)
        with v.lock:
            self.step_once(v, prompt, settings)
            return self.main_view(v, layer, head)

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
        for _ in range(count):
            with v.lock:
                self.step_once(v, prompt, settings)
                view = self.main_view(v, layer, head)
            yield view

    def undo(self, layer: Any, head: Any, request: gr.Request) -> Main:
        """Remove the last generated token (a warning, nothing else, at the start)."""
        v = self.ctx.visitor(request)
        with v.lock:
            if v.session is None or not v.session.steps:
                gr.Warning("Nothing to undo: only the prompt is left.")
                return skip(Main)
            v.session.undo()
            return self.main_view(v, layer, head)

    def reset(self, prompt: str, layer: Any, head: Any, request: gr.Request) -> Main:
        """Back to the prompt (the prompt box's current text)."""
        v = self.ctx.visitor(request)
        with v.lock:
            self.session(v, prompt).reset()
            return self.main_view(v, layer, head)

    def details_view(self, v: Visitor, layer: Any, step: Any = None) -> Details:
        """(head average, all-heads grid, logit lens) of the visitor's session (``v.lock`` held)."""
        s = v.session
        k = self.viewed(s, step)
        return Details(*self._layer_figures(self._attention(s, index(layer, s.model.cfg.n_layers), k)),
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
            a = self._attention(s, index(layer, cfg.n_layers), self.viewed(s, step))
            return Heads(self._heatmap(a, index(head, cfg.n_heads)), *self._layer_figures(a))

    # --------------------------------------------------------------- layout and wiring
    def build(self) -> dict[str, Any]:
        s, c = self.ctx.settings, self.c
        cfg0 = self.ctx.default_spec.cfg
        n_layers, n_heads = (cfg0.n_layers, cfg0.n_heads) if cfg0 is not None else (12, 12)
        main, details = Main.blank(FIRST_MESSAGE), Details.blank(FIRST_MESSAGE)
        with gr.Row(equal_height=True):
            c["prompt"] = gr.Textbox(DEFAULT_PROMPT, label="Prompt", scale=4, elem_id="gen-prompt",
                                     info="editing the prompt starts a new session at the next Step")
            c["n_steps"] = gr.Slider(1, s.max_steps_per_click, value=8, step=1, label="N for Step ×N", scale=2,
                                     elem_id="stepn-count")
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
                c["view_step"] = gr.Slider(0, 1, value=0, step=1, label="Viewing step (0 = the prompt)",
                                           elem_id="view-step", info="go back to any past step: every view follows")
                c["kv"] = gr.Markdown(main.kv, elem_id="kv-readout")
            with gr.Column(scale=2):
                c["topk"] = Plot(main.topk, show_label=False, elem_id="topk-plot")
                c["cand_csv"] = csv_button("candidates-csv")
        with gr.Row():
            c["layer"] = gr.Slider(0, max(1, n_layers - 1), value=0, step=1, label="Block (layer)",
                                   elem_id="layer-slider")
            c["head"] = gr.Slider(0, max(1, n_heads - 1), value=0, step=1, label="Head", elem_id="head-slider")
        with gr.Row():
            c["heatmap"] = Plot(main.heatmap, show_label=False, elem_id="heatmap")
            c["heatmap_avg"] = Plot(details.heatmap_avg, show_label=False, elem_id="heatmap-avg")
        c["grid"] = Plot(details.grid, show_label=False, elem_id="heads-grid")
        c["lens"] = Plot(details.lens, show_label=False, elem_id="lens-plot")
        with gr.Accordion("Raw data of the last step (what the step API returns)", open=False,
                          elem_id="step-json-acc"):
            c["step_json"] = gr.JSON(main.step_json, elem_id="step-json", show_label=False)
        return c

    def wire(self) -> None:
        c, ctx = self.c, self.ctx
        main, event, knobs = components(Main, c), ctx.model_event, self.sampling_inputs
        # Step, Step ×N and the details take their turn on the model inside (ctx.steps batches the
        # Steps of visitors who press at once), so figures are drawn outside the model's turn.
        after = dict(fn=self.details, inputs=[c["layer"], c["view_step"]], outputs=components(Details, c),
                     api_visibility="private", **event)
        #: The actions' follow-up events (for the page: remember the session after each).
        self.actions = [
            c["step_btn"].click(self.step, [c["prompt"], c["layer"], c["head"], *knobs], main,
                                api_name="step", **event).success(**after),
            c["stepn_btn"].click(self.step_n, [c["prompt"], c["n_steps"], c["layer"], c["head"], *knobs],
                                 main, api_name="step_n", **event).success(**after),
            c["undo_btn"].click(ctx.turns(self.undo), [c["layer"], c["head"]], main, api_name="undo",
                                **event).success(**after),
            c["reset_btn"].click(ctx.turns(self.reset), [c["prompt"], c["layer"], c["head"]], main, api_name="reset",
                                 **event).success(**after),
        ]
        gr.on([k.input for k in knobs], ctx.turns(self.candidates), [c["prompt"], *knobs], c["topk"],
              api_name="candidates", trigger_mode="always_last", **event)
        gr.on([c["layer"].input, c["head"].input], ctx.turns(self.attention), [c["layer"], c["head"], c["view_step"]],
              components(Heads, c), api_name="attention", trigger_mode="always_last", **event)
        c["view_step"].input(ctx.turns(self.view), [c["view_step"], c["layer"], c["head"]], main, api_name="view_step",
                             trigger_mode="always_last", **event).success(**after)
