"""Sampling controls of the Generate view: temperature (0 = greedy, the source's algorithm and the
default), top-k, top-p and a seed; the candidates chart shows what the next step draws from."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..generation.sampling import TEMPERATURE_MAX, TOP_K_MAX, TOP_P_MIN
from ..generation.session import GenerationSession
from .controls import Number, Slider
from .serving import error

DEFAULT_SEED = 123


def settings_of(temperature: Any, top_k: Any, top_p: Any, seed: Any) -> dict[str, Any]:
    """The sliders' values as :meth:`GenerationSession.set_sampling` arguments (top-k 0 and
    top-p 1 mean off); a message naming a bad value."""
    try:
        t = float(temperature if temperature is not None else 0.0)
        k = int(top_k) if top_k not in (None, "") else 0
        p = float(top_p) if top_p not in (None, "") else 1.0
        s = int(seed) if seed not in (None, "") else DEFAULT_SEED
    except (TypeError, ValueError, OverflowError):
        raise error(f"Sampling settings must be numbers, got temperature={temperature!r}, top_k={top_k!r}, "
                    f"top_p={top_p!r}, seed={seed!r}.") from None
    if not 0 <= t <= TEMPERATURE_MAX:
        raise error(f"temperature must be between 0 (greedy) and {TEMPERATURE_MAX:g}, got {t}.")
    if not 0 <= k <= TOP_K_MAX:
        raise error(f"top-k must be between 0 (off) and {TOP_K_MAX}, got {k}.")
    if not TOP_P_MIN <= p <= 1:
        raise error(f"top-p must be between {TOP_P_MIN:g} and 1 (1 = off), got {p}.")
    if not 0 <= s < 2**63:
        raise error(f"seed must be a whole number from 0, got {s}.")
    return dict(temperature=t, sample_top_k=k or None, top_p=None if p >= 1 else p, seed=s)


def apply(session: GenerationSession, settings: dict[str, Any]) -> None:
    """Use ``settings`` for the session's next steps (a message if they do not fit its model)."""
    top_k = settings["sample_top_k"]
    if top_k is not None:
        settings = dict(settings, sample_top_k=min(top_k, session.model.cfg.vocab_size))
    try:
        session.set_sampling(**settings)
    except ValueError as e:
        raise error(f"{e}.") from None


def build(c: dict[str, Any]) -> list[Any]:
    """The four controls, in the order the handlers take them."""
    with gr.Accordion("Sampling: temperature, top-k, top-p (temperature 0 is the source's greedy argmax)",
                      open=False, elem_id="sampling-acc"):
        with gr.Row():
            c["temperature"] = Slider(0, TEMPERATURE_MAX, value=0, step=0.05, label="temperature", elem_id="temperature",
                                         info="0 = greedy; 1 = the model's own distribution; >1 flatter")
            c["top_k"] = Slider(0, TOP_K_MAX, value=0, step=1, label="top-k", elem_id="top-k",
                                   info="keep the k most probable (0 = off)")
            c["top_p"] = Slider(TOP_P_MIN, 1, value=1, step=0.01, label="top-p (nucleus)", elem_id="top-p",
                                   info="keep the smallest set holding p (1 = off)")
            c["seed"] = Number(DEFAULT_SEED, label="seed", precision=0, elem_id="sample-seed", min_width=120,
                                  info="same seed, same draws")
    return [c["temperature"], c["top_k"], c["top_p"], c["seed"]]
