"""The page: theme, header, tabs, and the few wirings between views, in one place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr

from .atlas import ATLAS_JS, AtlasView
from .components import EXPORT_JS
from .generate import GenerateView
from .inside import InsideView
from .model import ModelView, Switched
from .outputs import components
from .parameters import ParametersView
from .serving import AppContext
from .share import ShareView
from .tokenizer import TokenizerView
from .train import TrainView
from .why import WhyPanel

STYLE = Path(__file__).with_name("style.css")
THEME = gr.themes.Soft(
    primary_hue="indigo", secondary_hue="teal", neutral_hue="slate",
    font=("ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"),
    font_mono=("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"),
)
HEADER = ("# gptviz · GPT-2 from the inside\nSee the tokens, step through greedy generation one token at a time "
          "with attention and logit lens, look inside the forward pass (shapes beside the code, head ablation, "
          "precision, KV cache) and count the parameters of any configuration.")

#: Scripts run once on page load, in order (each a ``() => {...}`` function; Gradio takes one ``js``,
#: :func:`page_js` joins them): the head-role atlas's click bridge, the SVG button of every figure.
PAGE_SCRIPTS = (ATLAS_JS, EXPORT_JS)


def page_js(*scripts: str) -> str:
    """One page-load function that calls each script's function in turn, each in its own ``try``
    (one failing leaves the others working)."""
    calls = "".join(f"  try {{ ({js.strip()})(); }} catch (e) {{ console.error('gptviz page script', e); }}\n"
                    for js in scripts)
    return "() => {\n" + calls + "}"


def launch_kwargs(ctx: AppContext | None = None) -> dict[str, Any]:
    """Arguments for ``demo.launch``: Gradio 6 takes the theme and CSS there. No run history:
    the browser would store every step's figures and each click would grow slower (~10 → 170 ms
    before the request leaves the page after 40 steps). No share link (a public tunnel) unless
    the operator asks. ``js``: the page scripts (:data:`PAGE_SCRIPTS`)."""
    return dict(theme=THEME, css_paths=[STYLE], js=page_js(*PAGE_SCRIPTS), run_history=False, share=False)


#: Gradio's queue recomputes its event analytics (a pandas table of up to 10,000 past events,
#: grouped by endpoint) after every event by default: 4 ms per event, 9-16 ms once a class has run
#: 10,000, on the server's CPU between visitors' events. Every 100 events keeps its monitoring
#: summary current enough; an operator's own setting wins.
ANALYTICS_EVERY = "100"


def build_page(ctx: AppContext) -> gr.Blocks:
    """Lay out every view in its tab, wire each view's own events, then the cross-view ones."""
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", ANALYTICS_EVERY)  # read when the queue is made
    tokenizer, generate, inside = TokenizerView(ctx), GenerateView(ctx), InsideView(ctx)
    parameters, model, train = ParametersView(ctx), ModelView(ctx), TrainView(ctx)
    share = ShareView(ctx, tokenizer, generate, model)
    atlas = AtlasView(ctx, generate)
    why = WhyPanel(ctx, generate)
    with gr.Blocks(title="gptviz: GPT-2 from the inside", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(HEADER, elem_id="header")
        share.build_state()
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Tokenizer", id="tokenizer", elem_id="tab-tokenizer"):
                tokenizer.build()
                share.link_row("tokenizer")
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate.build()
                atlas.build()
                why.build()
                share.files_row()
                share.link_row("generate")
            with gr.Tab("Inside", id="inside", elem_id="tab-inside") as inside_tab:
                inside.build()
                share.link_row("inside")
            with gr.Tab("Parameters", id="parameters", elem_id="tab-parameters"):
                parameters.build()
                share.link_row("parameters")
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                model.build()
                share.link_row("model")
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train.build()
        tokenizer.wire()
        generate.wire()
        atlas.wire()  # a click on its heatmap moves the Generate view's block and head
        why.wire()
        parameters.wire()
        # Between views: the Inside view traces the Generate view's text when its tab opens; a
        # model switch resets the Generate view; "Build random weights" reads the Parameters form;
        # links and lessons fill every view; each Generate action is remembered in the browser.
        inside.wire(inside_tab, generate.c["prompt"])
        model.wire(demo, generate.c, parameters.fields)
        train.wire(model.use_own, components(Switched, model.c, generate.c), parameters.fields)  # Explore: the Model view's switch
        share.wire(demo, tabs, dict(tokenizer=tokenizer.c, generate=generate.c, inside=inside.c,
                                    parameters=parameters.c, model=model.c), generate.actions)

        def release(request: gr.Request) -> None:
            """A tab closed: free its visitor's generation session now (not an hour later)."""
            ctx.visitors.release(request.session_hash)

        demo.unload(release)
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo
