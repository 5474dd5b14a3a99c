"""The app photographs itself: ``python -m gptviz.tools.screenshots [--out assets/screenshots] [--scale 2]``.

Starts the app on a free local port (offline, CPU, random weights with seed 123), drives it
in headless Chromium through Playwright and writes one 1280×800 PNG per entry of
:data:`SHOTS`, in order, in one browser page: later shots build on earlier ones (the
attention shots show the session that the generation shot stepped). Each shot names the model
it shows (:attr:`Shot.model`): where learned behaviour matters (generation, attention, the lens,
"why", sampling, the atlas, the Inside tab) that is the model trained here and shipped with the
app (:mod:`gptviz.files.shipped`), chosen on the Model tab as a visitor would; ``shots.json``
beside the PNGs records each picture's model. Every shot waits for
its content to be drawn (plot titles, chip counts, totals), never for a fixed time, and
fails if an element it names is missing, a message toast is showing, or an element it
must show whole lies partly outside the picture.

Adding a picture is one :class:`Shot` entry in :data:`SHOTS`. The PNGs are written as
Chromium encodes them: re-encoding (Pillow ``optimize``) gains nothing, and a 256-colour
palette would merge the light cells of the attention heatmaps.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..config import PRESETS
from ..files.shipped import SHIPPED_NAME, shipped_figures
from ..params import count_params
from ..settings import RANDOM, SEED, SHIPPED
from ..tokenizer import encode, get_encoding

if TYPE_CHECKING:  # Playwright is a test-only requirement: imported when shots are taken
    from playwright.sync_api import Page

CHROMIUM = os.environ.get("GPTVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = dict(width=1280, height=800)
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets" / "screenshots"
TIMEOUT_MS = 60_000

# What the shots show. ☕ and ⚡ are emoji that plain fonts (DejaVu) draw too, so no emoji font
# is needed; GPT-2 splits each into partial-UTF-8 tokens.
TOKENIZER_TEXT = "Hello, I run on ☕ and ⚡<|endoftext|>A new document"
DECODE_TEXT = "Coffee ☕"  # its ids are decoded back: two partial tokens make one character
PROMPT = "Every effort moves you"  # the book's chapter-5 prompt, typed for the shipped model's shots
STEPS = 6  # tokens generated before the Generate shots
#: The models a shot may show: the value of the Model tab's weights choice → the card's heading.
MODEL_LABELS = {RANDOM: f"random weights (seed {SEED})", SHIPPED: SHIPPED_NAME}


def _shown_head() -> tuple[int, int]:
    """The attention shots' block and head: the shipped model's strongest previous-token head on The Verdict."""
    best = shipped_figures().get("atlas", {}).get("verdict", {}).get("best", {}).get("previous_token")
    return (best["layer"], best["head"]) if best else (0, 0)


LAYER, HEAD = _shown_head()
#: The custom configuration, typed field by field in this order (every intermediate one is valid).
CUSTOM_FIELDS = dict(n_heads=8, emb_dim=512, n_layers=6, context_length=256)


def _has_text(elem_id: str, text: str) -> str:
    """JS: ``#elem_id`` contains ``text``."""
    return f"document.querySelector('#{elem_id}')?.textContent.includes({json.dumps(text)})"


def _has_value(elem_id: str, value: str) -> str:
    """JS: the text box ``#elem_id`` holds ``value``."""
    return f"document.querySelector('#{elem_id} textarea, #{elem_id} input')?.value === {json.dumps(value)}"


def _plot_title(elem_id: str, text: str) -> str:
    """JS: the plotly figure in ``#elem_id`` is drawn and its title contains ``text``."""
    return _has_text(f"{elem_id} .main-svg .gtitle", text)


def _count(selector: str, n: int) -> str:
    """JS: exactly ``n`` elements match ``selector``."""
    return f"document.querySelectorAll({json.dumps(selector)}).length === {n}"


def _set_slider(elem_id: str, value: int) -> list[tuple]:
    """Type ``value`` into a slider's number box (fires the slider's input event)."""
    box = f"#{elem_id} input[type=number]"
    return [("fill", box, str(value)), ("press", box, "Enter")]


def _ids(text: str) -> list[int]:
    return encode(text, get_encoding())


@dataclass(frozen=True)
class Shot:
    """One picture: open ``tab``, run ``actions``, wait until every ``ready`` holds, scroll
    ``frame`` to the top of the picture, check that every ``whole`` element is in it."""

    name: str  # the PNG's file name, without .png
    tab: str  # the label of the tab to open
    actions: Sequence[tuple] = ()  # Playwright Page calls in order, (method, *args): ("click", "#step-btn")
    ready: Sequence[str] = ()  # JS expressions, all true once the content is drawn
    frame: str = "#tabs"  # CSS selector of the element at the top of the picture …
    margin: int = 4  # … this many px below the picture's top edge
    whole: Sequence[str] = ()  # CSS selectors of elements that must lie entirely inside the picture
    timeout_ms: int = TIMEOUT_MS  # how long its content may take (training takes minutes on a slow CPU)
    model: str | None = None  # the model it shows (a key of MODEL_LABELS; None: no model's output in it)


SHOTS: tuple[Shot, ...] = (
    Shot("tokenizer", "Tokenizer",
         actions=[("fill", "#tokenize-input textarea", TOKENIZER_TEXT), ("click", "#tokenize-btn"),
                  ("fill", "#detokenize-input textarea", ", ".join(map(str, _ids(DECODE_TEXT)))),
                  ("click", "#detokenize-btn")],
         ready=[_count("#token-chips .chip", len(_ids(TOKENIZER_TEXT))),
                _has_text("token-stats", f"{len(_ids(TOKENIZER_TEXT))} tokens"),
                _has_value("detokenize-output", DECODE_TEXT)],
         whole=["#token-chips", "#token-table", "#detokenize-chips"]),
    Shot("generate", "Generate", model=SHIPPED,
         actions=[("fill", "#gen-prompt textarea", PROMPT), *_set_slider("stepn-count", STEPS), ("click", "#stepn-btn")],
         ready=[_count("#gen-text .chip.gen[title]", STEPS), _plot_title("topk-plot", f"Step {STEPS}:"),
                _plot_title("lens-plot", f"steps 1–{STEPS}")],
         whole=["#gen-text", "#kv-readout", "#topk-plot"]),
    Shot("attention", "Generate", model=SHIPPED,
         actions=[*_set_slider("layer-slider", LAYER), *_set_slider("head-slider", HEAD)],
         ready=[_plot_title("heatmap", f"Block {LAYER}, head {HEAD} "), _plot_title("heatmap-avg", f"Block {LAYER},"),
                _plot_title("heads-grid", f"Block {LAYER}:")],
         frame="#layer-slider", whole=["#layer-slider", "#heatmap", "#heatmap-avg"]),
    Shot("heads-grid", "Generate", model=SHIPPED, ready=[_plot_title("heads-grid", f"Block {LAYER}:")], frame="#heads-grid",
         whole=["#heads-grid"]),
    # The open raw-data accordion below makes the page long enough to put the lens at the top.
    Shot("logit-lens", "Generate", model=SHIPPED, actions=[("click", "#step-json-acc > button")],
         ready=[_plot_title("lens-plot", f"steps 1–{STEPS}"), _has_text("step-json", "last_step")],
         frame="#lens-plot", whole=["#lens-plot"]),
    # "Why this token?" for the sixth step: the exact split of its logit difference, lens lines, saliency.
    Shot("why", "Generate", model=SHIPPED, actions=[("click", "#step-json-acc > button"), ("click", "#why-acc > button"),
                                     ("click", "#why-btn")],
         ready=[_plot_title("why-plot", f"Step {STEPS}:"), _has_text("why-note", f"Step {STEPS}"),
                _plot_title("lens-lines", f"Step {STEPS}"), _plot_title("saliency-plot", "Saliency")],
         frame="#why-acc", whole=["#why-note", "#why-plot"]),
    # On The Verdict: on random tokens a model trained on a small text reads mostly tokens it never saw.
    Shot("head-roles", "Generate", model=SHIPPED,
         actions=[("click", "#why-acc > button"), ("click", "#atlas-acc > button"),
                  ("click", "#atlas-probe label:has-text('The Verdict')")],
         ready=[_plot_title("head-atlas", "The Verdict"), _has_text("atlas-top", "The Verdict")], frame="#atlas-acc",
         whole=["#head-atlas"]),
    Shot("sampling", "Generate", model=SHIPPED, actions=[("click", "#atlas-acc > button"), ("click", "#sampling-acc > button"),
                                          *_set_slider("temperature", 1), *_set_slider("top-k", 5)],
         ready=[_plot_title("topk-plot", "Next step (not taken yet)"), _has_text("topk-plot", "cut off")],
         frame="#sampling-acc", whole=["#sampling-acc", "#topk-plot"]),
    # The Inside tab looks at the same session: the tokens the next step reads.
    Shot("inside-shapes", "Inside", model=SHIPPED,
         ready=[_has_text("inside-about", f"the {len(_ids(PROMPT)) + STEPS} tokens"),
                _has_text("shape-table", "attn_scores"), _has_text("model-code", "attn_scores = queries @ keys"),
                "document.querySelector('#model-code .row.hl')?.textContent.includes('attn_scores')"],
         whole=["#inside-about", "#shape-table", "#model-code"]),
    Shot("inside-ablation", "Inside", model=SHIPPED, actions=[("click", "#ablate-btn")],
         ready=[_plot_title("ablate-plot", "Next token"), _has_text("ablate-summary", "Switched off"),
                _has_text("ablate-table", "%")],
         frame="#ablate-intro", whole=["#ablate-heads", "#ablate-summary", "#ablate-table", "#ablate-plot"]),
    Shot("inside-precision", "Inside", model=SHIPPED, actions=[("click", "#precision-btn")],
         ready=[_has_text("precision-summary", "largest logit difference"), _has_text("precision-table", "%")],
         frame="#precision-intro", whole=["#precision-summary", "#precision-table"]),
    Shot("inside-kv-cache", "Inside", model=SHIPPED, ready=[_has_text("kv-summary", "positions cached")], frame="#kv-intro",
         whole=["#kv-summary", "#kv-plot", "#kv-table"]),
    Shot("parameters", "Parameters",
         ready=[_has_text("params-total", f"{count_params(PRESETS['seed-124M']):,} parameters"),
                _plot_title("params-chart", "")],
         margin=16, whole=["#preset", "#params-total", "#params-chart", "#cfg-tie_weights"]),
    Shot("parameters-table", "Parameters", ready=[_has_text("params-table", "trf_blocks.*.att.W_query")],
         frame="#params-table", whole=["#params-table"]),  # every row, the total included
    Shot("parameters-custom", "Parameters",
         actions=[("fill", f"#cfg-{k} input", str(v)) for k, v in CUSTOM_FIELDS.items()],
         ready=[_has_text("params-total",
                          f"{count_params(PRESETS['seed-124M'].replace(**CUSTOM_FIELDS)):,} parameters"),
                _has_value("preset", "custom")],
         margin=16, whole=["#preset", "#params-total", "#params-chart", "#cfg-tie_weights"]),
    Shot("model", "Model", model=SHIPPED,
         ready=[_has_text("model-card", SHIPPED_NAME), _has_text("model-card", "trained here"),
                _has_text("upload-note", "restricted")],
         whole=["#weights-choice", "#model-card"]),
    Shot("train", "Train",  # the view before Start (a run takes minutes on a 2-core CPU)
         ready=[_has_text("train-status", "press Start"), _has_text("train-intro", "chapter 5")],
         whole=["#train-source", "#train-status", "#train-config"]),
)


@contextmanager
def running_app() -> Iterator[str]:
    """The app on a free local port, offline, on the CPU, with the default random weights
    (seed 123); yields its URL and closes it afterwards."""
    os.environ.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    from ..settings import Settings
    from ..ui import running_app as serve

    with serve(Settings(device="cpu")) as demo:
        yield demo.local_url


def switch_model(page: "Page", model: str) -> None:
    """Choose ``model`` on the Model tab and load it, as a visitor does (the Generate view starts over)."""
    page.get_by_role("tab", name="Model", exact=True).click()
    page.locator("#weights-choice").get_by_text(_choice_label(model), exact=True).click()
    page.click("#load-btn")
    page.wait_for_function(f"() => !!({_has_text('model-card', MODEL_LABELS[model])} && "
                           f"{_has_text('model-card', 'loaded')})", timeout=TIMEOUT_MS)
    try:  # the "Now using …" message: wait for it, close it, wait until it is gone
        page.wait_for_selector(".toast-body", timeout=5_000)
    except Exception:  # Playwright's TimeoutError: no message came
        return
    for button in page.locator(".toast-close").all():
        button.click()
    page.wait_for_selector(".toast-body", state="detached", timeout=TIMEOUT_MS)


def _choice_label(model: str) -> str:
    from ..ui.model import WEIGHT_CHOICES

    return next(label for label, value in WEIGHT_CHOICES if value == model)


def take(page: "Page", shot: Shot) -> bytes:
    """Run one shot in ``page``; the PNG of the viewport."""
    page.get_by_role("tab", name=shot.tab, exact=True).click()
    for method, *args in shot.actions:
        getattr(page, method)(*args)
    for condition in shot.ready:
        page.wait_for_function(f"() => !!({condition})", timeout=shot.timeout_ms)
    page.locator(shot.frame).wait_for()
    page.evaluate("([sel, margin]) => window.scrollBy(0, document.querySelector(sel).getBoundingClientRect().top "
                  "- margin)", [shot.frame, shot.margin])
    page.evaluate("() => document.activeElement?.blur()")  # no focus ring on the last box typed in
    page.mouse.move(1, 1)  # off every plot: no hover labels or plotly toolbars in the picture
    for selector in shot.whole:
        box = page.evaluate("sel => document.querySelector(sel)?.getBoundingClientRect().toJSON() ?? null", selector)
        if not box or not box["width"] or box["top"] < 0 or box["bottom"] > VIEWPORT["height"]:
            raise RuntimeError(f"shot {shot.name!r}: {selector} is not entirely in the picture (box: {box})")
    messages = page.locator(".toast-body").all_inner_texts()
    if messages:
        raise RuntimeError(f"shot {shot.name!r}: the app shows a message: {messages}")
    return page.screenshot(animations="disabled")  # CSS transitions finished: the same picture every run


def make_screenshots(out: Path = DEFAULT_OUT, scale: float = 1, shots: Sequence[Shot] = SHOTS) -> list[Path]:
    """Launch the app and a browser, take ``shots`` in order, write ``<out>/<name>.png``; the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    from playwright.sync_api import sync_playwright

    with running_app() as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=scale)
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[Exception] = []
            page.on("pageerror", lambda e: errors.append(e))
            page.goto(url)
            page.wait_for_selector("#tokenize-btn")
            current, shown = RANDOM, {}  # the app starts on random weights (seed 123)
            for shot in shots:
                t0 = time.perf_counter()
                if shot.model is not None and shot.model != current:
                    switch_model(page, shot.model)
                    current = shot.model
                png = take(page, shot)
                if errors:
                    raise RuntimeError(f"shot {shot.name!r}: JavaScript error in the page: {errors}")
                path = out / f"{shot.name}.png"
                path.write_bytes(png)
                shown[shot.name] = {"tab": shot.tab, "model": MODEL_LABELS[shot.model] if shot.model else None}
                print(f"{path}: {path.stat().st_size / 1e3:.0f} kB, {time.perf_counter() - t0:.1f} s, "
                      f"model: {shown[shot.name]['model'] or '(none shown)'}")
                paths.append(path)
        finally:
            browser.close()
            if shown:  # which model each picture shows, for the README's tour
                (out / "shots.json").write_text(json.dumps(shown, indent=1) + "\n", encoding="utf-8")
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gptviz.tools.screenshots",
                                     description="Screenshots of the running app: " + ", ".join(s.name for s in SHOTS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=1,
                        help="device scale factor: 2 writes 2560×1600 PNGs of the same 1280×800 view")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    make_screenshots(args.out, args.scale)
    print(f"{len(SHOTS)} screenshots in {time.perf_counter() - t0:.1f} s (app start included)")


if __name__ == "__main__":
    main()
