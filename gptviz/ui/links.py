"""Links that reopen an exact view: URL query parameters ⇄ a :class:`View`, checked.

``/?tab=generate&prompt=Hello%2C%20I%20am&steps=6&layer=5&head=1`` opens the Generate view
with six steps run from that prompt and block 5, head 1 shown. Every parameter is checked
against an allow-list and a range; anything else is dropped with a specific warning (the
page opens the default view, never an error page), and nothing in a link is ever a path.
Pure: no Gradio here, so the parser is fuzzed directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping
from urllib.parse import urlencode

from ..config import CONFIG_FIELDS, PRESETS, GPTConfig, config_from_fields
from ..files.weights import is_allowed_name
from ..generation.sampling import TEMPERATURE_MAX, TOP_K_MAX, TOP_P_MIN
from ..settings import DTYPES, RANDOM, Settings

__all__ = ["View", "parse_link", "link_query", "TABS"]

TABS = ("tokenizer", "generate", "inside", "parameters", "model")
MAX_LINK_STEPS = 64  # steps a link may ask for (a Step ×N click's limit)


@dataclass
class View:
    """What a link (or a restored session) asks the page to show. None: leave as it is."""

    tab: str | None = None
    text: str | None = None  # tokenizer
    prompt: str | None = None  # generate
    steps: int = 0
    layer: int | None = None
    head: int | None = None
    weights: str | None = None  # RANDOM or an allowed name
    dtype: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    preset: str | None = None  # parameters
    config: GPTConfig | None = None
    heads: str | None = None  # inside: heads to switch off
    expected_ids: list[int] | None = None  # a restored session: the ids it had (checked after the steps)
    warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) in (None, 0) for f in fields(self) if f.name not in ("warnings", "expected_ids"))


def _number(raw: str, kind: type, name: str, lo: float, hi: float, view: View) -> Any:
    try:
        value = kind(raw)
    except (TypeError, ValueError, OverflowError):
        view.warnings.append(f"{name}={raw[:20]!r} is not a {'whole ' if kind is int else ''}number: ignored.")
        return None
    if isinstance(value, float) and not math.isfinite(value) or not lo <= value <= hi:
        view.warnings.append(f"{name}={raw[:20]} is outside {lo:g} … {hi:g}: ignored.")
        return None
    return value


def parse_link(params: Mapping[str, str], settings: Settings) -> View:
    """The view a link asks for. Unknown names, bad values and out-of-range numbers become
    warnings; a value is never used as a path or passed on unchecked."""
    view = View()
    params = {str(k)[:40]: str(v)[: settings.max_text_chars] for k, v in params.items()}
    known = {"tab", "text", "prompt", "steps", "layer", "head", "weights", "dtype", "temperature", "top_k", "top_p",
             "seed", "preset", "heads", "__theme", *CONFIG_FIELDS}
    unknown = sorted(k for k in params if k not in known)
    if unknown:
        view.warnings.append(f"Unknown link parameter{'s' if len(unknown) > 1 else ''} ignored: "
                             f"{', '.join(u[:20] for u in unknown[:5])}.")
    tab = params.get("tab")
    if tab is not None:
        if tab in TABS:
            view.tab = tab
        else:
            view.warnings.append(f"There is no tab {tab[:20]!r} (tabs: {', '.join(TABS)}): the default view opens.")
    for name in ("text", "prompt", "heads"):
        if name in params:
            setattr(view, name, params[name])
    if "steps" in params:
        steps = _number(params["steps"], int, "steps", 0, MAX_LINK_STEPS, view)
        view.steps = steps or 0
    for name, hi in (("layer", 10_000), ("head", 10_000)):  # checked against the model when it is known
        if name in params:
            setattr(view, name, _number(params[name], int, name, 0, hi, view))
    weights = params.get("weights")
    if weights is not None:
        if weights == RANDOM or is_allowed_name(weights):
            view.weights = weights
        else:
            view.warnings.append(f"weights={weights[:30]!r} is not one this app offers: the current model stays.")
    dtype = params.get("dtype")
    if dtype is not None:
        if dtype in DTYPES:
            view.dtype = dtype
        else:
            view.warnings.append(f"dtype={dtype[:20]!r} is not one of {', '.join(DTYPES)}: ignored.")
    if "temperature" in params:
        view.temperature = _number(params["temperature"], float, "temperature", 0, TEMPERATURE_MAX, view)
    if "top_k" in params:
        view.top_k = _number(params["top_k"], int, "top_k", 0, TOP_K_MAX, view)
    if "top_p" in params:
        view.top_p = _number(params["top_p"], float, "top_p", TOP_P_MIN, 1, view)
    if "seed" in params:
        view.seed = _number(params["seed"], int, "seed", 0, 2**31 - 1, view)
    preset = params.get("preset")
    if preset is not None:
        if preset in PRESETS:
            view.preset = preset
        else:
            view.warnings.append(f"There is no preset {preset[:20]!r} (presets: {', '.join(PRESETS)}): ignored.")
    given = [f for f in CONFIG_FIELDS if f in params]
    if given:
        base = PRESETS[view.preset or "seed-124M"]
        raw = {f: params.get(f, getattr(base, f)) for f in CONFIG_FIELDS}
        for flag in ("qkv_bias", "tie_weights"):
            raw[flag] = str(raw[flag]).lower() in ("1", "true", "yes", "on")
        try:
            view.config = config_from_fields(*(raw[f] for f in CONFIG_FIELDS))
        except ValueError as e:
            view.warnings.append(f"The link's configuration is invalid ({e}): the preset is shown.")
    return view


def link_query(view: View) -> str:
    """``?tab=…&…``: the query string that reopens ``view`` (None fields left out)."""
    items: list[tuple[str, Any]] = []
    for name in ("tab", "text", "prompt", "steps", "layer", "head", "weights", "dtype", "temperature", "top_k",
                 "top_p", "seed", "preset", "heads"):
        value = getattr(view, name)
        if value is not None and not (name == "steps" and not value):
            items.append((name, value))
    if view.config is not None:
        items += [(f, int(v) if isinstance(v, bool) else v) for f in CONFIG_FIELDS for v in [getattr(view.config, f)]]
    return "?" + urlencode(items)
