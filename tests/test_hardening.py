"""Hostile input, bounded memory and safe deployment, at the level of the app's handlers.

Fuzzed with hypothesis: every text a visitor can send (odd Unicode of every kind, lone
surrogates as the API's JSON can deliver them, HTML, ``<|endoftext|>``) either works, with
well-formed output, or is refused with a gr.Error that says why. The launched app under
concurrent load is tested in test_concurrency.py.
"""

from __future__ import annotations

import gc
import json
import re
import threading
import warnings
import weakref
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

import gradio as gr
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gptviz import GPTConfig, GPTModel, encode, ui
from gptviz.generation import DEFAULT_MAX_RETAINED_BYTES
from gptviz.weights import PRETRAINED_NAMES, WeightsError

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


def quietly(fn, *args):
    """Call a handler, collecting its gr.Warning texts (outside a request they are Python warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [str(w.message) for w in caught]


@pytest.fixture
def visitor(tiny_cfg) -> ui.Visitor:
    return ui.Visitor(ui.ModelSpec(ui.RANDOM, tiny_cfg))


# --------------------------------------------------------------------------- text handlers, fuzzed


@FUZZ
@given(texts)
def test_tokenize_any_text(text):
    (chips, summary, ids_text, table), said = quietly(ui.tokenize, text)
    ids = [int(i) for i in ids_text.split(", ")] if ids_text else []
    assert ui.get_encoding().decode(ids) == surrogates_replaced(text)  # nothing lost, nothing invented
    assert chip_ids(chips) == ids[: ui.MAX_CHIPS] and table["id"].tolist() == ids[: ui.MAX_CHIPS]
    assert_safe_html(chips)
    json.dumps(table.to_dict(), ensure_ascii=False).encode("utf-8")
    assert any("surrogate" in s for s in said) == (surrogates_replaced(text) != text)


def test_tokenize_escapes_script_and_shows_lone_surrogates_as_replacement():
    (chips, *_), said = quietly(ui.tokenize, 'a<script>alert("x")</script>\ud800&')
    assert "&lt;" in chips and "&gt;" in chips and "&amp;" in chips and "<script" not in chips  # < script > chips
    assert "\ufffd" in chips and said == ["The text holds 1 unpaired UTF-16 surrogate (not Unicode characters); "
                                          "each is read as U+FFFD �."]


@FUZZ
@given(texts)
def test_detokenize_any_text_is_read_or_refused(text):
    try:
        (decoded, chips), _ = quietly(ui.detokenize, text)
    except gr.Error as e:
        assert str(e.message).strip()
        return
    assert_safe_html(chips)
    decoded.encode("utf-8")


@FUZZ
@given(st.lists(st.integers(0, 50256), min_size=1, max_size=40), st.sampled_from([", ", " ", ",", "\n", "; "]),
       st.booleans())
def test_detokenize_any_ids(ids, sep, brackets):
    text = sep.join(map(str, ids))
    decoded, chips = ui.detokenize(f"[{text}]" if brackets else text)
    assert decoded == ui.get_encoding().decode(ids) and chip_ids(chips) == ids
    assert_safe_html(chips)


@pytest.mark.parametrize("item", ["9" * 5000, "-" + "9" * 30, "1" + "0" * 12])
def test_detokenize_refuses_huge_numbers_by_name(item):
    with pytest.raises(gr.Error, match=r"Item 2 \(\d{0,20}.*\) is outside the GPT-2 vocabulary"):
        ui.detokenize(f"11 {item}")


@pytest.mark.parametrize("item", ["١٢٣", "１２", "0x10", "1e3", "²"])
def test_detokenize_refuses_non_ascii_digits_and_notations(item):
    with pytest.raises(gr.Error, match="not a whole number"):
        ui.detokenize(item)


@FUZZ
@given(prompt=texts)
def test_step_any_prompt(tiny_cfg, prompt):
    v = ui.Visitor(ui.ModelSpec(ui.RANDOM, tiny_cfg))
    try:
        (text, topk, heatmap, kv, data, state), said = quietly(ui.step, prompt, 0, 0, v)
    except gr.Error as e:
        assert not surrogates_replaced(prompt) and "prompt is empty" in e.message
        return
    prompt_ids = encode(surrogates_replaced(prompt))
    assert data["ids"][: len(prompt_ids)] == prompt_ids and data["steps"] == 1
    assert_safe_html(text)
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # what the step API sends
    heatmap.to_json().encode("utf-8")
    topk.to_json().encode("utf-8")


head_specs = st.lists(st.tuples(st.integers(0, 2), st.one_of(st.integers(0, 4), st.just("*"))), min_size=1,
                      max_size=3).map(lambda hs: ", ".join(f"{layer}.{head}" for layer, head in hs))


@FUZZ
@given(prompt=texts, heads=st.one_of(head_specs, texts))
def test_ablation_any_heads_text(tiny_cfg, prompt, heads):
    v = ui.Visitor(ui.ModelSpec(ui.RANDOM, tiny_cfg))
    try:
        (summary, table, figure), _ = quietly(ui.ablation, prompt or PROMPT, heads, v)
    except gr.Error as e:
        assert str(e.message).strip()
        return
    assert_safe_html(summary, SUMMARY_TAGS)
    assert "Switched off" in summary and len(table) == ui.TOP_K
    figure.to_json().encode("utf-8")


def test_step_escapes_html_in_the_growing_text(visitor):
    text, *_ = ui.step("<img src=x onerror=alert(1)>{{a}}", 0, 0, visitor)
    assert "<img" not in text and "&lt;" in text and "{{" not in text and "&#123;" in text
    assert_safe_html(text)


numbers = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                    st.text(max_size=6), st.sampled_from(["1e400", "nan", "-inf", " 12 ", "0x10"]))


@FUZZ
@given(st.tuples(numbers, numbers, numbers, numbers, numbers, numbers, st.booleans(), st.booleans()))
def test_params_any_fields(fields):
    out, said = quietly(ui.params, *fields)
    assert len(out) == 5
    if all(x == gr.skip() for x in out):
        assert any("Invalid configuration" in s for s in said)  # the reason is named
    else:
        assert re.match(r"## [\d,]+ parameters", out[0])


#: (vocab, context, emb, heads, layers, dtype): plausible shapes on both sides of a 50 MB limit, or anything.
plausible = st.builds(lambda ctx, h, d, n, dt: (50257, ctx, h * d, h, n, dt), st.integers(1, 2048),
                      st.integers(1, 8), st.integers(1, 64), st.integers(1, 8), st.sampled_from(["float32", "bfloat16"]))
hostile = st.tuples(st.sampled_from([50257, 50257.0, 1, None, "x"]), st.one_of(st.integers(-5, 10**7), numbers),
                    st.one_of(st.integers(-5, 10**6), numbers), st.integers(0, 64), st.integers(-1, 10**5),
                    st.sampled_from(["float32", "float8", None, "../x"]))


@FUZZ
@given(st.one_of(plausible, hostile))
@example((50257, 64, 32, 4, 2, "float32"))  # built
@example((50257, 10**6, 64, 4, 48, "bfloat16"))  # a small model whose causal masks alone are 48 TB
def test_build_model_never_builds_beyond_the_limit(fields):
    vocab, ctx, emb, heads, layers, dtype = fields
    built = []

    def fake_build(spec):  # stands in for torch: record what would be built
        built.append(spec)
        return GPTModel(GPTConfig(context_length=8, emb_dim=8, n_heads=2, n_layers=1)).eval()

    with mock.patch.object(ui, "build_model", fake_build), mock.patch.object(ui, "MODELS", ui.ModelStore()), \
            mock.patch.dict("os.environ", GPTVIZ_MAX_MODEL_BYTES="50e6"):  # a limit that small shapes cross
        v = ui.Visitor(ui.ModelSpec(ui.RANDOM, GPTConfig(context_length=8, emb_dim=8, n_heads=2, n_layers=1)))
        try:
            quietly(ui.build_custom, vocab, ctx, emb, heads, layers, 0.0, False, False, dtype, v)
        except gr.Error as e:
            assert str(e.message).strip() and not built
            return
        assert len(built) == 1 and built[0].weight_bytes() <= ui.max_model_bytes() == 50_000_000


def test_a_model_at_the_limit_is_refused_with_its_size():
    v = ui.Visitor()
    with pytest.raises(gr.Error, match=r"needs [\d.]+ GB for its weights; this app allows 4.00 GB"):
        ui.build_custom(50257, 1024, 2048, 16, 64, 0.0, False, False, "float32", v)  # ~3.4 B parameters
    total, *_ = ui.params(50257, 1024, 2048, 16, 64, 0.0, False, False)  # the table still counts it
    assert "parameters" in total


# --------------------------------------------------------------------------- deployment safety


HOSTILE_NAMES = ["../../etc/passwd", "/etc/passwd", "https://evil.example/model.safetensors", "gpt2/../../x",
                 "openai-community/gpt2", "evil/gpt2", "GPT2", "gpt2 ", "gpt2\x00", "file:///etc/passwd",
                 "~/.cache/huggingface", "C:\\Windows", "", None, 0, ["gpt2"], "\ud800"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_weights_selector_refuses_everything_but_the_allow_list(name, visitor):
    def nothing(*args, **kwargs):
        raise AssertionError("a visitor's input reached the loader")

    with mock.patch.object(ui, "load_pretrained", nothing), mock.patch("gptviz.weights.hf_hub_download", nothing):
        with pytest.raises(gr.Error, match="Unknown weights"):
            ui.load_weights(name, "float32", visitor)


@FUZZ
@given(st.text(max_size=40))
def test_weights_selector_fuzzed(name):
    if name in PRETRAINED_NAMES or name == ui.RANDOM:
        return
    with pytest.raises(gr.Error, match="Unknown weights"):
        ui.load_weights(name, "float32", ui.Visitor())


def test_allowed_names_reach_only_the_loader_by_name(visitor, monkeypatch):
    asked = []

    def loader(name, **kwargs):
        asked.append(name)
        raise WeightsError("offline")

    monkeypatch.setattr(ui, "load_pretrained", loader)
    monkeypatch.setattr(ui, "MODELS", ui.ModelStore())
    with pytest.raises(gr.Error, match="offline"):
        ui.load_weights("gpt2-medium", "bfloat16", visitor)
    assert asked == ["gpt2-medium"]  # a name, resolved to openai-community/ by gptviz.weights


def test_a_path_comes_only_from_the_operator(monkeypatch):
    monkeypatch.setenv("GPTVIZ_WEIGHTS", "/srv/ckpt")
    assert ui.default_spec().source == "/srv/ckpt"  # the operator's variable is the one way to a path
    assert "/srv" not in ui.ModelSpec("/srv/ckpt").label
    assert all(value in (ui.RANDOM, *PRETRAINED_NAMES) for _, value in ui.WEIGHT_CHOICES)


def test_no_share_link_and_a_pinned_gradio():
    assert ui.LAUNCH_KWARGS["share"] is False
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    front = re.search(r"^---\n(.*?)\n---", (ROOT / "README.md").read_text(), re.S).group(1)
    assert pins["gradio"] == gr.__version__ == re.search(r"sdk_version: (\S+)", front).group(1)
    assert int(pins["gradio"].split(".")[0]) == 6


# --------------------------------------------------------------------------- memory and turns


def test_a_session_keeps_the_engines_memory_budget(visitor):
    ui.step(PROMPT, 0, 0, visitor)
    assert visitor.session.max_retained_bytes == DEFAULT_MAX_RETAINED_BYTES <= 64 * 10**6


def test_live_sessions_are_capped_least_recently_used_first(tiny_cfg, monkeypatch):
    monkeypatch.setattr(ui, "MAX_LIVE_SESSIONS", 3)
    monkeypatch.setattr(ui, "_LIVE", weakref.WeakSet())
    vs = [ui.Visitor(ui.ModelSpec(ui.RANDOM, tiny_cfg)) for _ in range(5)]
    for v in vs[:3]:
        ui.step(PROMPT, 0, 0, v)
    dropped = weakref.ref(vs[1].session)
    with vs[0].lock:  # the least recently used is busy: it keeps its session, the next idle one goes
        ui.step(PROMPT, 0, 0, vs[3])
    assert [v.session is not None for v in vs] == [True, False, True, True, False]
    ui.step(PROMPT, 0, 0, vs[4])  # now vs[0] goes
    assert [v.session is not None for v in vs] == [False, False, True, True, True]
    gc.collect()
    assert dropped() is None  # its KV cache and history are gone
    (*_, data, _), said = quietly(ui.step, PROMPT, 0, 0, vs[1])
    assert data["steps"] == 1 and any("released to make room" in s for s in said)  # told, and starts again


def test_a_deleted_state_frees_its_session_unless_busy(visitor):
    ui.step(PROMPT, 0, 0, visitor)
    session = weakref.ref(visitor.session)
    with visitor.lock:
        ui._drop(visitor)  # busy: Gradio drops the state itself, the running step finishes
    assert visitor.session is not None
    ui._drop(visitor)
    gc.collect()
    assert visitor.session is None and session() is None
    ui._drop(None)  # a tab that never stepped


def test_take_turns_holds_the_model_lock_per_step_and_releases_it_on_errors():
    seen = []

    def gen(n):
        for k in range(n):
            seen.append(ui.MODEL_LOCK.locked())
            yield k

    wrapped = ui._take_turns(gen)
    out = []
    for k in wrapped(3):
        out.append(k)
        seen.append(ui.MODEL_LOCK.locked())  # free between steps: others take their turn
    assert out == [0, 1, 2] and seen == [True, False] * 3

    def fails():
        assert ui.MODEL_LOCK.locked()
        raise gr.Error("no")

    with pytest.raises(gr.Error):
        ui._take_turns(fails)()
    assert not ui.MODEL_LOCK.locked()


def test_every_model_event_takes_turns_and_closing_a_tab_releases_its_state():
    demo = ui.build_demo(preload=False)
    fns = list(demo.fns.values())
    model = [f for f in fns if f.concurrency_id == "model"]
    assert {f.name for f in model} >= {"step", "step_n", "undo", "reset", "details", "attention"}
    assert all(hasattr(f.fn, "__wrapped__") for f in model)
    assert all(not hasattr(f.fn, "__wrapped__") for f in fns if f.concurrency_id != "model")
    assert next(f for f in model if f.name == "step_n").types_generator
    assert any(t[1] == "unload" for f in fns for t in f.targets)
    state = next(b for b in demo.blocks.values() if isinstance(b, gr.State))
    assert state.time_to_live == ui.SESSION_TTL_S and state.delete_callback is ui._drop
    assert ui.LAUNCH_KWARGS["state_session_capacity"] == ui.MAX_SESSIONS


def test_visitors_can_step_from_many_threads_at_once(tiny_cfg, tiny_model):
    """Handlers called concurrently (as Gradio's worker threads do): each visitor gets exactly
    its own prompt's greedy tokens."""
    prompts = [f"Visitor {k} says" for k in range(6)]
    got: dict[int, list[int]] = {}

    def run(k):
        v = ui.Visitor(ui.ModelSpec(ui.RANDOM, tiny_cfg))
        for _ in ui._take_turns(ui.step_n)(prompts[k], 5, 0, 0, v):
            pass
        got[k] = v.session.ids

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, p in enumerate(prompts):
        ids = torch.tensor([encode(p)])
        with torch.no_grad():
            for _ in range(5):
                ids = torch.cat([ids, tiny_model(ids[:, -tiny_cfg.context_length:])[:, -1].argmax(-1, keepdim=True)], 1)
        assert got[k] == ids[0].tolist()
