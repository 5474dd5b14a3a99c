"""The checked controls: what an API client sends a slider, number or checkbox, and the message
it gets back (the launched app's sweep over every endpoint is in test_concurrency.py)."""

from __future__ import annotations

import math

import gradio as gr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptviz.ui.controls import Checkbox, Number, Slider, checked_number


def refused(control, payload) -> str:
    with pytest.raises(gr.Error) as e:
        control.preprocess(payload)
    return e.value.message


@given(st.integers(0, 11))
def test_a_whole_number_in_range_passes_unchanged(k):
    assert Slider(0, 11, step=1, label="Head").preprocess(k) == k


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_is_taken_or_refused_by_name(x):
    s = Slider(0, 11, step=1, label="Head")
    if math.isfinite(x) and x.is_integer() and 0 <= x <= 11:
        assert s.preprocess(x) == x
    else:
        assert refused(s, x).startswith("Head must be a whole number from 0 to 11, got ")


@pytest.mark.parametrize("payload, got", [(None, "None"), ("", "''"), ("three", "'three'"), (True, "True"),
                                          ([1], "[1]"), ({"a": 1}, "{'a': 1}"), (2.5, "2.5"), (12, "12"), (-1, "-1")])
def test_what_a_slider_refuses_and_says(payload, got):
    assert refused(Slider(0, 11, step=1, label="Block (layer)"), payload) == \
        f"Block (layer) must be a whole number from 0 to 11, got {got}."


def test_a_numeric_string_is_read_as_its_number():
    assert Slider(0, 11, step=1, label="Head").preprocess(" 3 ") == 3
    assert Slider(0, 2, step=0.05, label="temperature").preprocess("0.7") == pytest.approx(0.7)


def test_a_fractional_slider_takes_fractions_within_its_bounds():
    s = Slider(0.01, 1, step=0.01, label="top-p (nucleus)")
    assert s.preprocess(0.5) == 0.5
    assert refused(s, 0) == "top-p (nucleus) must be a number from 0.01 to 1, got 0."


def test_a_whole_number_field_without_bounds():
    n = Number(123, precision=0, label="seed")
    assert n.preprocess(7) == 7
    assert refused(n, None) == "seed must be a whole number, got None."
    assert refused(n, float("nan")) == "seed must be a whole number, got nan."


@pytest.mark.parametrize("payload", [None, "true", 1, 0, "yes"])
def test_a_checkbox_takes_only_true_or_false(payload):
    box = Checkbox(False, label="value-weighted")
    assert box.preprocess(True) is True and box.preprocess(False) is False
    assert refused(box, payload) == f"value-weighted must be true or false, got {payload!r}."


def test_checked_number_keeps_an_ints_type():
    assert type(checked_number(8, "N", 1, 64, True)) is int  # Step ×N counts with it: range(n)


def test_the_page_draws_them_as_gradios_own():
    assert [c.get_block_name() for c in (Slider(), Number(), Checkbox())] == ["slider", "number", "checkbox"]
