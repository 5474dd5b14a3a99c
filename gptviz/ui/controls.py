"""Controls that check what the API sends them: ``Slider``, ``Number`` and ``Checkbox``.

The page's own controls always send a value in range, but an API client (``gradio_client``,
curl) can send anything, ``None`` included. Gradio's ``Slider`` compares the value with its
bounds before any handler runs, so ``None`` ended in its bare "The upstream Gradio app has
raised an exception"; these say which control and what it takes, e.g. "Block (layer) must be a
whole number from 0 to 11, got None." The message comes from ``preprocess`` (a ``gr.Error``
there reaches the visitor as is). Each class keeps Gradio's name, so the page draws it as the
component it extends.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr

from .serving import error

__all__ = ["Slider", "Number", "Checkbox", "checked_number"]


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) and not x.is_integer() else f"{int(x)}"


def checked_number(payload: Any, name: str, minimum: float | None, maximum: float | None, whole: bool) -> float | int:
    """``payload`` as a finite number (a whole one if ``whole``) within the bounds, or a message
    naming the control. A numeric string ("3") is read as the number; ``True``/``False`` are not numbers."""
    kind = "whole number" if whole else "number"
    span = f" from {_fmt(minimum)} to {_fmt(maximum)}" if minimum is not None and maximum is not None else ""
    value = None
    if isinstance(payload, (int, float)) and not isinstance(payload, bool):
        value = float(payload)
    elif isinstance(payload, str):
        try:
            value = float(payload.strip())
        except ValueError:
            value = None
    got = repr(payload) if not isinstance(payload, str) else repr(payload[:20])
    if value is None or not math.isfinite(value) or (whole and not value.is_integer()):
        raise error(f"{name} must be a {kind}{span}, got {got}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(f"{name} must be a {kind}{span}, got {_fmt(value)}.")
    return payload if isinstance(payload, (int, float)) else int(value) if whole else value


def _whole(step: Any, precision: Any) -> bool:
    return precision == 0 or (isinstance(step, (int, float)) and float(step).is_integer() and precision is None)


class Slider(gr.Slider):
    """``gr.Slider`` that names itself when the API sends no number, a non-number or one out of range."""

    def preprocess(self, payload: Any) -> float:
        value = checked_number(payload, self.label or "This slider", self.minimum, self.maximum,
                               _whole(self.step, self.precision))
        return gr.Number.round_to_precision(value, self.precision)


class Number(gr.Number):
    """``gr.Number`` that requires a value: ``None`` or a non-number gets a message naming the field."""

    def preprocess(self, payload: Any) -> float | int:
        value = checked_number(payload, self.label or "This number", self.minimum, self.maximum, self.precision == 0)
        return gr.Number.round_to_precision(value, self.precision)


class Checkbox(gr.Checkbox):
    """``gr.Checkbox`` that takes only ``true`` or ``false``."""

    def preprocess(self, payload: Any) -> bool:
        if not isinstance(payload, bool):
            raise error(f"{self.label or 'This checkbox'} must be true or false, got {payload!r}.")
        return payload
