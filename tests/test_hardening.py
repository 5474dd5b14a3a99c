"""Hostile input, bounded memory and safe deployment, at the level of the app's handlers.

Fuzzed with hypothesis: every text a visitor can send (odd Unicode of every kind, lone
surrogates as the API's JSON can deliver them, HTML, ``<|endoftext|>``) either works, with
well-formed output, or is refused with a gr.Error that says why. The launched app under
concurrent load is tested in test_concurrency.py.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

import gradio as gr
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gptviz import GPTConfig, GPTModel, encode, get_encoding
from gptviz.files.weights import PRETRAINED_NAMES, WeightsError
from gptviz.generation.session import DEFAULT_MAX_RETAINED_BYTES
from gptviz.settings import RANDOM, SHIPPED, Settings
from gptviz.ui import LAUNCH_KWARGS, models, serving
from gptviz.ui.generate import GenerateView
from gptviz.ui.inside import InsideView
from gptviz.ui.model import WEIGHT_CHOICES, ModelView
from gptviz.ui.outputs import skip
from gptviz.ui.parameters import Counted, ParametersView
from gptviz.ui.serving import AppContext, ModelSpec, ModelStore
from gptviz.ui.tokenizer import TokenizerView

from .conftest import visit

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Hello, I am"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Pieces that break naive text handling: ZWJ sequences, combining marks, bidi controls,
#: right-to-left and CJK text, control characters including NUL, BOM, private use, the last
#: code point, lone surrogates, the special token (whole and cut), HTML and template syntax.
ODD = ["👩‍👩‍👧‍👦", "🏳️‍🌈", "e\u0301\u0302\u0303", "\u202e", "\u200f", "\u2066", "שלום", "مرحبا", "日本語",
       "\x00", "\x1b[31m", "\r\n", "\x7f", "\ufeff", "\ufffd", "\ue000", "\U0010ffff", "\ud800", "\udfff",
       "\udbff\udc00", "<|endoftext|>", "<|endoftext", "<script>alert(1)</script>", "&amp;", "{{x}}", "${x}", "\t"]
texts = st.lists(st.one_of(st.sampled_from(ODD), st.text(st.characters(exclude_categories=[]), max_size=8)),
                 max_size=12).map("".join)


def surrogates_replaced(text: str) -> str:
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


class Tags(HTMLParser):
    """The tags of an HTML fragment (a `<script>` left unescaped would show up here)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)


CHIP_TAGS = {"div", "span", "br"}
SUMMARY_TAGS = {"div", "span", "p", "b", "table", "tr", "th", "td"}


def assert_safe_html(html: str, tags: set[str] = CHIP_TAGS) -> None:
    """Only the app's own markup, no raw control characters, and valid UTF-8 (no lone
    surrogates, which the server could not send)."""
    assert Tags(html).tags <= tags
    assert "<script" not in html and not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", html)
    html.encode("utf-8")


def chip_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<span class="tid">(\d+)</span>', html)]


def quietly(fn, *args, **kwargs):
    """Call a handler, collecting its gr.Warning texts (outside a request they are Python warnings).
    A handler that streams (runs in slices) is run to its end: its last item is its output."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
        if hasattr(out, "__next__"):
            out = list(out)[-1]
    return out, [str(w.message) for w in caught]


LIMITS = Settings(device="cpu")
_visitors = itertools.count()


def new_visitor():
    """A request from a visitor not seen before (a fresh session_hash)."""
    return visit(f"visitor-{next(_visitors)}")


@pytest.fixture(scope="module")
def app(tiny_cfg, ui_models) -> AppContext:
    """One context for the module (hypothesis examples share it, as visitors share the app);
    each example is a new visitor."""
    ctx = AppContext(LIMITS, default_spec=ModelSpec(RANDOM, tiny_cfg))
    ctx.models = ui_models
    return ctx


@pytest.fixture
def a():
    return new_visitor()


# --------------------------------------------------------------------------- text handlers, fuzzed


@FUZZ
@given(text=texts)
def test_tokenize_any_text(app, text):
    out, said = quietly(TokenizerView(app).tokenize, text)
    ids = [int(i) for i in out.tok_ids.split(", ")] if out.tok_ids else []
    assert get_encoding().decode(ids) == surrogates_replaced(text)  # nothing lost, nothing invented
    assert chip_ids(out.tok_chips) == ids[: LIMITS.max_chips] and out.tok_table["id"].tolist() == ids[: LIMITS.max_chips]
    assert_safe_html(out.tok_chips)
    json.dumps(out.tok_table.to_dict(), ensure_ascii=False).encode("utf-8")
    assert any("surrogate" in s for s in said) == (surrogates_replaced(text) != text)


def test_tokenize_escapes_script_and_shows_lone_surrogates_as_replacement(app):
    out, said = quietly(TokenizerView(app).tokenize, 'a<script>alert("x")</script>\ud800&')
    chips = out.tok_chips
    assert "&lt;" in chips and "&gt;" in chips and "&amp;" in chips and "<script" not in chips  # < script > chips
    assert "\ufffd" in chips and said == ["The text holds 1 unpaired UTF-16 surrogate (not Unicode characters); "
                                          "each is read as U+FFFD �."]


@FUZZ
@given(text=texts)
def test_detokenize_any_text_is_read_or_refused(app, text):
    try:
        out, _ = quietly(TokenizerView(app).detokenize, text)
    except gr.Error as e:
        assert str(e.message).strip()
        return
    assert_safe_html(out.detok_chips)
    out.detok_out.encode("utf-8")


@FUZZ
@given(ids=st.lists(st.integers(0, 50256), min_size=1, max_size=40),
       sep=st.sampled_from([", ", " ", ",", "\n", "; "]), brackets=st.booleans())
def test_detokenize_any_ids(app, ids, sep, brackets):
    text = sep.join(map(str, ids))
    out = TokenizerView(app).detokenize(f"[{text}]" if brackets else text)
    assert out.detok_out == get_encoding().decode(ids) and chip_ids(out.detok_chips) == ids
    assert_safe_html(out.detok_chips)


@pytest.mark.parametrize("item", ["9" * 5000, "-" + "9" * 30, "1" + "0" * 12])
def test_detokenize_refuses_huge_numbers_by_name(app, item):
    with pytest.raises(gr.Error, match=r"Item 2 \(\d{0,20}.*\) is outside the GPT-2 vocabulary"):
        TokenizerView(app).detokenize(f"11 {item}")


@pytest.mark.parametrize("item", ["١٢٣", "１２", "0x10", "1e3", "²"])
def test_detokenize_refuses_non_ascii_digits_and_notations(app, item):
    with pytest.raises(gr.Error, match="not a whole number"):
        TokenizerView(app).detokenize(item)


@FUZZ
@given(prompt=texts)
def test_step_any_prompt(app, prompt):
    try:
        out, said = quietly(GenerateView(app).step, prompt, 0, 0, request=new_visitor())
    except gr.Error as e:
        assert not surrogates_replaced(prompt) and "prompt is empty" in e.message
        return
    data = out.step_json
    prompt_ids = encode(surrogates_replaced(prompt))
    assert data["ids"][: len(prompt_ids)] == prompt_ids and data["steps"] == 1
    assert_safe_html(out.gen_text)
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # what the step API sends
    out.heatmap.to_json().encode("utf-8")
    out.topk.to_json().encode("utf-8")


head_specs = st.lists(st.tuples(st.integers(0, 2), st.one_of(st.integers(0, 4), st.just("*"))), min_size=1,
                      max_size=3).map(lambda hs: ", ".join(f"{layer}.{head}" for layer, head in hs))


@FUZZ
@given(prompt=texts, heads=st.one_of(head_specs, texts))
def test_ablation_any_heads_text(app, prompt, heads):
    try:
        out, _ = quietly(InsideView(app).ablation, prompt or PROMPT, heads, request=new_visitor())
    except gr.Error as e:
        assert str(e.message).strip()
        return
    assert_safe_html(out.ablate_summary, SUMMARY_TAGS)
    assert "Switched off" in out.ablate_summary and len(out.ablate_table) == LIMITS.top_k
    out.ablate_plot.to_json().encode("utf-8")


def test_step_escapes_html_in_the_growing_text(app, a):
    text = GenerateView(app).step("<img src=x onerror=alert(1)>{{a}}", 0, 0, request=a).gen_text
    assert "<img" not in text and "&lt;" in text and "{{" not in text and "&#123;" in text
    assert_safe_html(text)


numbers = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                    st.text(max_size=6), st.sampled_from(["1e400", "nan", "-inf", " 12 ", "0x10"]))


@FUZZ
@given(fields=st.tuples(numbers, numbers, numbers, numbers, numbers, numbers, st.booleans(), st.booleans()))
def test_params_any_fields(app, fields):
    out, said = quietly(ParametersView(app).params, *fields)
    assert len(out) == len(Counted._fields)
    if out == skip(Counted):
        assert any("Invalid configuration" in s for s in said)  # the reason is named
    else:
        assert re.match(r"## [\d,]+ parameters", out.p_total)


#: (vocab, context, emb, heads, layers, dtype): plausible shapes on both sides of a 50 MB limit, or anything.
plausible = st.builds(lambda ctx, h, d, n, dt: (50257, ctx, h * d, h, n, dt), st.integers(1, 2048),
                      st.integers(1, 8), st.integers(1, 64), st.integers(1, 8), st.sampled_from(["float32", "bfloat16"]))
hostile = st.tuples(st.sampled_from([50257, 50257.0, 1, None, "x"]), st.one_of(st.integers(-5, 10**7), numbers),
                    st.one_of(st.integers(-5, 10**6), numbers), st.integers(0, 64), st.integers(-1, 10**5),
                    st.sampled_from(["float32", "float8", None, "../x"]))
TINY = GPTConfig(context_length=8, emb_dim=8, n_heads=2, n_layers=1)


@FUZZ
@given(fields=st.one_of(plausible, hostile))
@example(fields=(50257, 64, 32, 4, 2, "float32"))  # built
@example(fields=(50257, 10**6, 64, 4, 48, "bfloat16"))  # a small model whose causal masks alone are 48 TB
def test_build_model_never_builds_beyond_the_limit(fields):
    vocab, ctx_len, emb, heads, layers, dtype = fields
    built = []

    def fake_build(spec):  # stands in for torch: record what would be built
        built.append(spec)
        return GPTModel(TINY).eval()

    ctx = AppContext(Settings(device="cpu", max_model_bytes=50_000_000),  # a limit that small shapes cross
                     default_spec=ModelSpec(RANDOM, TINY))
    ctx.models = ModelStore(fake_build)
    try:
        quietly(ModelView(ctx).build_custom, vocab, ctx_len, emb, heads, layers, 0.0, False, False, dtype,
                request=visit("v"))
    except gr.Error as e:
        assert str(e.message).strip() and not built
        return
    assert len(built) == 1 and built[0].weight_bytes() <= ctx.settings.max_model_bytes == 50_000_000


def test_a_model_at_the_limit_is_refused_with_its_size(a):
    ctx = AppContext(Settings(device="cpu"))
    with pytest.raises(gr.Error, match=r"needs [\d.]+ GB for its weights; this app allows 4.00 GB"):
        ModelView(ctx).build_custom(50257, 1024, 2048, 16, 64, 0.0, False, False, "float32", request=a)  # ~3.4 B parameters
    total = ParametersView(ctx).params(50257, 1024, 2048, 16, 64, 0.0, False, False).p_total  # the table counts it
    assert "parameters" in total


# --------------------------------------------------------------------------- deployment safety


HOSTILE_NAMES = ["../../etc/passwd", "/etc/passwd", "https://evil.example/model.safetensors", "gpt2/../../x",
                 "openai-community/gpt2", "evil/gpt2", "GPT2", "gpt2 ", "gpt2\x00", "file:///etc/passwd",
                 "~/.cache/huggingface", "C:\\Windows", "", None, 0, ["gpt2"], "\ud800"]


def nothing(*args, **kwargs):
    raise AssertionError("a visitor's input reached the loader")


@pytest.fixture(scope="module")
def no_loading(tiny_cfg) -> AppContext:
    """A context that fails the test if anything would be built or loaded."""
    ctx = AppContext(LIMITS, default_spec=ModelSpec(RANDOM, tiny_cfg))
    ctx.models = ModelStore(nothing)
    return ctx


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_weights_selector_refuses_everything_but_the_allow_list(name, no_loading, a):
    with mock.patch("gptviz.files.weights.hf_hub_download", nothing):
        with pytest.raises(gr.Error, match="Unknown weights"):
            ModelView(no_loading).load_weights(name, "float32", request=a)
    assert no_loading.visitor(a).spec == no_loading.default_spec


@FUZZ
@given(name=st.text(max_size=40))
def test_weights_selector_fuzzed(no_loading, name):
    if name in PRETRAINED_NAMES or name in (RANDOM, SHIPPED):
        return
    with pytest.raises(gr.Error, match="Unknown weights"):
        ModelView(no_loading).load_weights(name, "float32", request=new_visitor())


def test_allowed_names_reach_only_the_loader_by_name(a, tiny_cfg):
    asked = []

    def loader(name, **kwargs):
        asked.append(name)
        raise WeightsError("offline")

    ctx = AppContext(LIMITS, default_spec=ModelSpec(RANDOM, tiny_cfg))  # its own store: nothing loaded yet
    with mock.patch.object(models, "load_pretrained", loader):  # the one loader the app's models come from
        with pytest.raises(gr.Error, match="offline"):
            ModelView(ctx).load_weights("gpt2-medium", "bfloat16", request=a)
    assert asked == ["gpt2-medium"]  # a name, resolved to openai-community/ by gptviz.files.weights


def test_a_path_comes_only_from_the_operator():
    operator = Settings.from_env({"GPTVIZ_WEIGHTS": "/srv/ckpt"})
    assert ModelSpec.default(operator).source == "/srv/ckpt"  # the operator's variable is the one way to a path
    assert "/srv" not in ModelSpec("/srv/ckpt").label
    assert all(value in (RANDOM, SHIPPED, *PRETRAINED_NAMES) for _, value in WEIGHT_CHOICES)  # SHIPPED: assets/models/


def test_no_share_link_and_a_pinned_gradio():
    assert LAUNCH_KWARGS["share"] is False
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    front = re.search(r"^---\n(.*?)\n---", (ROOT / "README.md").read_text(), re.S).group(1)
    assert pins["gradio"] == gr.__version__ == re.search(r"sdk_version: (\S+)", front).group(1)
    assert int(pins["gradio"].split(".")[0]) == 6


# --------------------------------------------------------------------------- memory
# (the live-session cap, closed tabs and turns on the model: tests/test_ui_serving.py)


def test_a_session_keeps_the_engines_memory_budget(app, a):
    GenerateView(app).step(PROMPT, 0, 0, request=a)
    assert app.visitor(a).session.max_retained_bytes == DEFAULT_MAX_RETAINED_BYTES <= 64 * 10**6


def test_many_visitors_keep_at_most_the_live_limit_of_sessions(make_ctx):
    ctx = make_ctx(max_live_sessions=4, max_sessions=6)
    gen = GenerateView(ctx)
    for k in range(10):
        gen.step(PROMPT, 0, 0, request=visit(f"crowd-{k}"))
        assert ctx.visitors.live_sessions() <= 4 and len(ctx.visitors) <= 6
    assert ctx.visitors.live_sessions() == 4
