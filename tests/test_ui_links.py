"""Links that reopen a view (gptviz.ui.links): ``link_query`` → ``parse_link`` keeps the view, and a
fuzz of arbitrary query dictionaries never raises, never lets a path or an unknown model name
through, keeps every number in its range, and warns about every value it rejects."""

from __future__ import annotations

import math
from urllib.parse import parse_qsl

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from gptviz.config import CONFIG_FIELDS, PRESETS, GPTConfig
from gptviz.files.weights import PRETRAINED_NAMES
from gptviz.generation.sampling import TEMPERATURE_MAX, TOP_K_MAX, TOP_P_MIN
from gptviz.settings import DTYPES, RANDOM, Settings
from gptviz.ui.links import MAX_LINK_STEPS, TABS, View, link_query, parse_link

SETTINGS = Settings()
WEIGHTS = {RANDOM, *PRETRAINED_NAMES}
NUMBERS = {  # name: (kind, lo, hi) as the parser checks them
    "steps": (int, 0, MAX_LINK_STEPS), "layer": (int, 0, 10_000), "head": (int, 0, 10_000),
    "temperature": (float, 0, 5), "top_k": (int, 0, 50257), "top_p": (float, 0, 1), "seed": (int, 0, 2**31 - 1),
}
KNOWN = {"tab", "text", "prompt", "weights", "dtype", "preset", "heads", "__theme", *NUMBERS, *CONFIG_FIELDS}


def reopen(view: View) -> View:
    """The view a browser gets from the link of ``view`` (the query string as the server reads it)."""
    query = link_query(view)
    assert query.startswith("?")
    return parse_link(dict(parse_qsl(query[1:], keep_blank_values=True)), SETTINGS)


def fields_of(view: View) -> dict:
    return {k: v for k, v in vars(view).items() if k not in ("warnings", "expected_ids")}


@pytest.mark.parametrize("view", [
    View(tab="generate", prompt="Hello, I am", steps=6, layer=5, head=1),
    View(tab="generate", prompt="Über & ünïcode? a=b&c #frag 🙂", steps=64, layer=0, head=0, weights="gpt2",
         dtype="bfloat16", temperature=0.7, top_k=40, top_p=0.95, seed=2**31 - 1),
    View(tab="tokenizer", text="  spaces, +plus+ and %41 stay as typed\n"),
    View(tab="inside", prompt="x", steps=3, heads="0.1, 2.3", weights=RANDOM, dtype="float16"),
    View(tab="parameters", preset="gpt2-medium"),
    View(tab="parameters", config=GPTConfig(vocab_size=50257, context_length=256, emb_dim=96, n_heads=3, n_layers=5,
                                            drop_rate=0.25, qkv_bias=True, tie_weights=True)),
    View(tab="model", weights=PRETRAINED_NAMES[-1], dtype="float32"),
    View(tab="generate", prompt="", steps=0, temperature=0.0, top_k=0, top_p=1.0, seed=0),
])
def test_link_round_trip_keeps_the_view(view):
    back = reopen(view)
    assert back.warnings == []
    assert fields_of(back) == fields_of(view)


def test_the_documented_link():
    view = parse_link({"tab": "generate", "prompt": "Hello, I am", "steps": "6", "layer": "5", "head": "1"}, SETTINGS)
    assert (view.tab, view.prompt, view.steps, view.layer, view.head, view.warnings) == (
        "generate", "Hello, I am", 6, 5, 1, [])
    assert link_query(view) == "?tab=generate&prompt=Hello%2C+I+am&steps=6&layer=5&head=1"


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tab=st.none() | st.sampled_from(TABS), prompt=st.none() | texts, text=st.none() | texts,
    steps=st.integers(0, MAX_LINK_STEPS), layer=st.none() | st.integers(0, 10_000),
    head=st.none() | st.integers(0, 10_000), weights=st.none() | st.sampled_from(sorted(WEIGHTS)),
    dtype=st.none() | st.sampled_from(list(DTYPES)),
    temperature=st.none() | st.floats(0, TEMPERATURE_MAX), top_k=st.none() | st.integers(0, TOP_K_MAX),
    top_p=st.none() | st.floats(TOP_P_MIN, 1), seed=st.none() | st.integers(0, 2**31 - 1),
    preset=st.none() | st.sampled_from(list(PRESETS)), heads=st.none() | texts,
)
def test_link_round_trip_fuzzed(**fields):
    view = View(**fields)
    back = reopen(view)
    assert back.warnings == []
    assert fields_of(back) == fields_of(view)


# --------------------------------------------------------------------------- hostile links

NASTY = st.sampled_from([
    "../../etc/passwd", "/srv/ckpt", "/srv/ckpt/model.safetensors", "owner/repo", "openai-community/gpt2",
    "C:\\Windows\\system32", "file:///etc/passwd", "gpt2 ", " gpt2", "GPT2", "gpt2\x00", "random/../x",
    "nan", "NaN", "-nan", "inf", "-inf", "1e400", "-1e400", "1e-400", "9" * 5000, "-" + "9" * 30, "1" + "0" * 400,
    "0x10", "1_0", "٣", "５", "3.0", "-0", "+5", " 7 ", "", "  ", "true", "None", "null", "[]", "{}",
    "\ud800", "🙂", "é" * 50, "<script>alert(1)</script>", "%00", "&tab=model", "float32", "float64",
    "bfloat16", "generate", "parameters", "tokenizer", *PRETRAINED_NAMES, RANDOM, *PRESETS,
])
NUMBER_TEXT = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.decimals(allow_nan=True, allow_infinity=True).map(str))
VALUES = st.one_of(NASTY, NUMBER_TEXT, st.text(max_size=30))
KEYS = st.one_of(st.sampled_from(sorted(KNOWN)), st.text(max_size=40))


def mentions(view: View, name: str) -> bool:
    return any(name in w for w in view.warnings)


def check_view(params: dict[str, str], view: View) -> None:
    """Every field is allowed and in range; every value left unused is named in a warning."""
    assert view.tab is None or view.tab in TABS
    assert view.weights is None or view.weights in WEIGHTS
    assert view.dtype is None or view.dtype in DTYPES
    assert isinstance(view.steps, int) and not isinstance(view.steps, bool) and 0 <= view.steps <= MAX_LINK_STEPS
    assert view.preset is None or view.preset in PRESETS
    assert view.config is None or isinstance(view.config, GPTConfig)
    for name, (kind, lo, hi) in NUMBERS.items():
        value = getattr(view, name)
        if value is not None:
            assert type(value) is kind and lo <= value <= hi and math.isfinite(value), (name, value)
    for name in ("text", "prompt", "heads"):
        assert getattr(view, name) == params.get(name)  # free text, kept as typed (never used as a path)

    if "tab" in params and view.tab != params["tab"]:
        assert view.tab is None and mentions(view, "no tab")
    for name in ("weights", "dtype", "preset"):
        if name in params and getattr(view, name) != params[name]:
            assert getattr(view, name) is None and mentions(view, name)
    for name, (kind, _, _) in NUMBERS.items():
        if name not in params:
            continue
        value = getattr(view, name)
        if any(w.startswith(f"{name}=") for w in view.warnings):
            assert value in (None, 0) if name == "steps" else value is None
        else:  # no warning: the value was used, as written
            assert value == kind(params[name]), (name, params[name], value)
    if any(f in params for f in CONFIG_FIELDS) and view.config is None:
        assert mentions(view, "configuration is invalid")
    if set(params) - KNOWN:
        assert mentions(view, "Unknown link parameter")
    if params and not view.warnings:  # nothing rejected: every known value is in the view
        assert not set(params) - KNOWN


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=12))
def test_any_query_is_parsed_safely(params):
    check_view(params, parse_link(params, SETTINGS))


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(KNOWN - {"text", "prompt", "heads"})), VALUES, min_size=1, max_size=6))
def test_every_known_parameter_with_hostile_values(params):
    check_view(params, parse_link(params, SETTINGS))


@pytest.mark.parametrize("name, raw", [
    ("weights", "../../etc/passwd"), ("weights", "/srv/ckpt"), ("weights", "owner/repo"), ("weights", "GPT2"),
    ("dtype", "float64"), ("tab", "admin"), ("preset", "gpt5"), ("steps", "65"), ("steps", "-1"), ("steps", "nan"),
    ("steps", "9" * 5000), ("layer", "1e400"), ("head", "10001"), ("temperature", "nan"), ("temperature", "inf"),
    ("temperature", "5.01"), ("top_p", "-0.1"), ("top_k", "50258"), ("seed", str(2**31)), ("seed", "x"),
    ("emb_dim", "7"), ("n_heads", "0"), ("banana", "1"),
])
def test_each_rejected_value_warns(name, raw):
    view = parse_link({name: raw}, SETTINGS)
    assert len(view.warnings) == 1
    check_view({name: raw}, view)
    assert view.empty  # nothing of it is used


def test_values_longer_than_the_text_limit_are_cut():
    view = parse_link({"prompt": "a" * (SETTINGS.max_text_chars + 5), "k" * 500: "v"}, SETTINGS)
    assert view.prompt == "a" * SETTINGS.max_text_chars
    assert len(view.warnings) == 1 and "Unknown" in view.warnings[0] and len(view.warnings[0]) < 200


@pytest.mark.parametrize("name, raw", [("temperature", "5"), ("temperature", "2.5"), ("top_k", "50257"),
                                       ("top_k", "201"), ("top_p", "0"), ("top_p", "0.005")])
def test_every_sampling_value_a_link_accepts_fits_its_slider(name, raw):
    import gradio as gr

    from gptviz.ui import sampling

    with gr.Blocks():
        sliders: dict = {}
        sampling.build(sliders)
    view = parse_link({name: raw}, SETTINGS)
    value = getattr(view, name)
    if value is not None:  # accepted: the page sets the slider to it, and the next event sends it back
        sliders[name].preprocess(value)  # gr.Error when outside the slider's range
    else:
        assert mentions(view, name)
