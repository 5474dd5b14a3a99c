"""The Gradio explorer: Tokenizer, Generate, Parameters and Model views.

Every event handler is a module-level function of plain values (plus the visitor's
:class:`Visitor` kept in ``gr.State``), so tests call them without a browser. Models are
shared read-only by all visitors through :data:`MODELS`, a small cache with a lock; a
visitor's own state is a :class:`Visitor`: the model it chose and its
:class:`~gptviz.generation.GenerationSession` (KV cache and step history, no model copy).

Named endpoints (``api_name``, usable from ``gradio_client``; one session per client):
``tokenize``, ``detokenize``, ``step``, ``step_n``, ``undo``, ``reset``, ``attention``,
``params``, ``preset``, ``load_model``, ``build_model``.

Environment: ``GPTVIZ_WEIGHTS`` picks the model loaded at start (``random``: the source's
seed-124M configuration with seed 123, the default, works offline; ``gpt2`` …
``gpt2-xl``: the released weights from the Hub; any other value: a local checkpoint path,
for operators only). ``GPTVIZ_MAX_MODEL_BYTES`` caps the weights a visitor may build or
load (default 4 GB). ``GPTVIZ_DEVICE`` overrides the device.
"""

from __future__ import annotations

import html
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterator

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import torch

from . import plots
from .config import PRESETS, GPTConfig
from .generation import GenerationSession
from .model import GPTModel, select_device
from .params import (config_from_fields, count_params, format_breakdown, memory_and_compute, nearest_preset,
                     param_breakdown)
from .tokenizer import ENDOFTEXT_ID, TokenPiece, encode, get_encoding, show_whitespace, token_piece
from .weights import PRETRAINED_NAMES, WeightsError, estimated_bytes, is_allowed_name, load_pretrained

# --------------------------------------------------------------------------- limits and defaults

MAX_TEXT_CHARS = 20_000  # tokenizer text, prompts and id lists
MAX_PROMPT_TOKENS = 1_024  # a prompt longer than this is refused (the model's context is cropped anyway)
MAX_CHIPS = 2_048  # tokens drawn as chips and table rows (a whole session); the count covers all
MAX_STEPS_PER_CLICK = 64  # Step ×N
MAX_SESSION_TOKENS = 2_048  # prompt + generated tokens in one session (all drawn as chips)
ATTN_WINDOW = 64  # heatmaps show the attention among the last this many tokens
LENS_STEPS = 24  # logit lens: the last this many steps
TOP_K = 10
SESSION_TTL_S = 3_600  # a visitor's state is dropped an hour after its last update
DEFAULT_PROMPT = "Hello, I am"
SEED = 123
DEFAULT_MAX_MODEL_BYTES = 4_000_000_000
RANDOM = "random"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: The Model view's weights selector: random weights (seed 123) or a released GPT-2.
WEIGHT_CHOICES = [(f"random weights (seed {SEED})", RANDOM)] + [(n, n) for n in PRETRAINED_NAMES]
CONFIG_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias",
                 "tie_weights")
CUSTOM = "custom"


def max_model_bytes() -> int:
    """The largest model (bytes of weights) a visitor may build or load: ``GPTVIZ_MAX_MODEL_BYTES``."""
    raw = os.environ.get("GPTVIZ_MAX_MODEL_BYTES", "").strip()
    return int(float(raw)) if raw else DEFAULT_MAX_MODEL_BYTES


def _error(message: str) -> gr.Error:
    """A message for the visitor (no traceback in the server log: it is their input, not a bug)."""
    return gr.Error(message, print_exception=False)


def _esc(text: str) -> str:
    """HTML-escape, including the characters gr.HTML's template engine would interpret."""
    return html.escape(text).replace("{", "&#123;").replace("}", "&#125;").replace("$", "&#36;")


# --------------------------------------------------------------------------- shared models


@dataclass(frozen=True)
class ModelSpec:
    """What a shared model is made from; the key of :data:`MODELS`."""

    source: str  # RANDOM, a released GPT-2 name, or an operator's checkpoint path
    cfg: GPTConfig | None = None  # the configuration of random weights
    dtype: str = "float32"

    @property
    def label(self) -> str:
        if self.source == RANDOM:
            name = next((n for n, c in PRESETS.items() if c == self.cfg), "custom configuration")
            return f"random weights (seed {SEED}), {name}, {self.dtype}"
        if is_allowed_name(self.source):
            return f"{self.source}, {self.dtype}"
        return f"the operator's local checkpoint, {self.dtype}"  # never show a server path to visitors

    def weight_bytes(self) -> int | None:
        """Estimated bytes of the loaded model; None for an operator's path (its size is unknown)."""
        if self.source == RANDOM:
            return estimated_bytes(self.cfg, DTYPES[self.dtype])
        if is_allowed_name(self.source):
            return estimated_bytes(self.source, DTYPES[self.dtype])
        return None


def default_spec() -> ModelSpec:
    """The model every visitor starts with: ``GPTVIZ_WEIGHTS`` (default: random, seed-124M)."""
    source = os.environ.get("GPTVIZ_WEIGHTS", "").strip() or RANDOM
    return ModelSpec(RANDOM, PRESETS["seed-124M"]) if source == RANDOM else ModelSpec(source)


_SEED_LOCK = threading.Lock()  # seeding and initialising a random model is one atomic act


def build_model(spec: ModelSpec) -> GPTModel:
    """Make the model a spec describes, on :func:`select_device`, in eval mode."""
    device, dtype = select_device(), DTYPES[spec.dtype]
    if spec.source != RANDOM:
        return load_pretrained(spec.source, device=device, dtype=dtype)
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):  # seeded init, without disturbing anyone's RNG
        torch.manual_seed(SEED)
        model = GPTModel(spec.cfg)
    return model.to(device=device, dtype=dtype).eval()


class ModelStore:
    """Models shared read-only by every visitor, least recently used dropped beyond ``capacity``.

    A model is built once: concurrent requests for the same spec wait for the first build.
    Sessions hold a reference to their model, so dropping it here never breaks a visitor.
    """

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._models: OrderedDict[ModelSpec, Future] = OrderedDict()

    def get(self, spec: ModelSpec) -> GPTModel:
        with self._lock:
            future = self._models.get(spec)
            owner = future is None
            if owner:
                future = self._models[spec] = Future()
            self._models.move_to_end(spec)
        if owner:
            try:
                future.set_result(build_model(spec))
            except BaseException as e:
                future.set_exception(e)
                with self._lock:
                    self._models.pop(spec, None)
            with self._lock:
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
        return future.result()

    def __contains__(self, spec: ModelSpec) -> bool:
        with self._lock:
            future = self._models.get(spec)
        return future is not None and future.done() and future.exception() is None


MODELS = ModelStore()


# --------------------------------------------------------------------------- per-visitor state


@dataclass
class Visitor:
    """One browser tab's state (in ``gr.State``): its chosen model and its generation session."""

    spec: ModelSpec = field(default_factory=lambda: default_spec())
    session: GenerationSession | None = None  # holds a reference to the shared model, never a copy
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one event at a time

    @property
    def model(self) -> GPTModel:
        return MODELS.get(self.spec)


def _visitor(state: Visitor | None) -> Visitor:
    return state if isinstance(state, Visitor) else Visitor()


def _model_of(v: Visitor) -> GPTModel:
    try:
        return v.model
    except WeightsError as e:
        raise _error(f"Could not load {v.spec.label}: {e}") from None


# --------------------------------------------------------------------------- tokenizer view


_CHIP_COLORS = ("#FFE3C2", "#CFE6FA", "#D7F0D0", "#F6D5EA", "#FFF2B3", "#E0DAF8")

CHIP_CSS = """
.chips { line-height: 2.3; font-size: 15px; padding: 6px 2px; }
.chip { display: inline-block; border-radius: 6px; padding: 0 5px; margin: 1px 2px; color: #1f2430;
        font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre; }
.chip .tid { font-size: 10.5px; color: #555c6b; margin-left: 4px; vertical-align: sub; }
.chip.special { background: #2f3542 !important; color: #fff; }
.chip.special .tid { color: #d0d4dc; }
.chip.partial { outline: 2px dashed #b34; }
.chip.gen { background: #C9F0E4 !important; font-weight: 600; }
.chip.gen.last { outline: 2px solid #0d8a6a; }
.chip.unseen { opacity: 0.45; }
.legend { font-size: 13px; color: #555c6b; margin-top: 4px; }
.legend .chip { line-height: 1.6; }
.note { font-size: 13px; color: #8a5a00; }
"""


#: Other control characters as their Unicode "control pictures" (NUL → ␀), after show_whitespace.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(0x20)} | {0x7F: 0x2421}


def _display(p: TokenPiece) -> tuple[str, str]:
    """(text shown for a token, CSS class): whitespace and control characters made visible,
    partial UTF-8 shown as its bytes, ``<|endoftext|>`` marked as special."""
    if p.special:
        return p.text, "special"
    if p.partial:
        return p.text, "partial"
    return show_whitespace(p.text).translate(_CONTROL_PICTURES), ""


def _label(token_id: int, enc=None, width: int = 12) -> str:
    """Short display text of a token for plot axes."""
    text, _ = _display(token_piece(token_id, enc))
    return text if len(text) <= width else text[: width - 1] + "…"


def chips_html(ids: list[int], enc=None, *, generated_from: int | None = None, unseen_before: int = 0) -> str:
    """Token chips: the piece and its id, coloured by position (HTML, every text escaped).

    ``generated_from``: ids from this index on are generated (drawn as such, the last one
    outlined); ``unseen_before``: earlier ids lie outside the model's context (dimmed).
    """
    enc = enc or get_encoding()
    out = []
    for k, token_id in enumerate(ids[:MAX_CHIPS]):
        p = token_piece(token_id, enc)
        text, kind = _display(p)
        generated = generated_from is not None and k >= generated_from
        classes = ["chip", kind, "gen" if generated else "", "last" if generated and k == len(ids) - 1 else "",
                   "unseen" if k < unseen_before else ""]
        note = " · special token" if p.special else " · partial UTF-8 (part of a character)" if p.partial else ""
        title = f"position {k} · id {token_id} · bytes {p.hex}{note}"
        color = _CHIP_COLORS[k % len(_CHIP_COLORS)]
        out.append(
            f'<span class="{" ".join(c for c in classes if c)}" style="background:{color}" title="{_esc(title)}">'
            f'{_esc(text)}<span class="tid">{token_id}</span></span>'
            + ("<br>" if "\n" in p.text and not p.partial else "")  # a newline token ends the line of chips
        )
    if len(ids) > MAX_CHIPS:
        out.append(f'<div class="note">… and {len(ids) - MAX_CHIPS:,} more tokens (the first {MAX_CHIPS:,} '
                   "are drawn)</div>")
    return '<div class="chips">' + "".join(out) + "</div>"


def _token_table(ids: list[int], enc) -> pd.DataFrame:
    rows = []
    for k, token_id in enumerate(ids[:MAX_CHIPS]):
        p = token_piece(token_id, enc)
        kind = "special" if p.special else "partial UTF-8" if p.partial else ""
        rows.append(dict(position=k, id=token_id, piece=_display(p)[0], bytes=p.hex, note=kind))
    return pd.DataFrame(rows, columns=["position", "id", "piece", "bytes", "note"])


def _check_text(text: str | None, what: str) -> str:
    text = text or ""
    if len(text) > MAX_TEXT_CHARS:
        raise _error(f"The {what} is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,}. "
                     "Shorten it and try again.")
    return text


def tokenize(text: str) -> tuple[str, str, str, pd.DataFrame]:
    """Text → (chips HTML, summary, ids as text, table of position/id/piece/bytes).

    A typed ``<|endoftext|>`` becomes token 50256 (see :func:`gptviz.tokenizer.encode`)."""
    text = _check_text(text, "text")
    enc = get_encoding()
    ids = encode(text, enc)
    if not ids:
        return ('<div class="chips note">Type some text to see its tokens.</div>', "0 tokens", "",
                _token_table([], enc))
    n_special = ids.count(ENDOFTEXT_ID)
    summary = (f"**{len(ids):,} tokens** · {len(text):,} characters · "
               f"**{len(text) / len(ids):.2f} characters per token**")
    if n_special:
        summary += f" · {n_special} × `<|endoftext|>` (id {ENDOFTEXT_ID})"
    return chips_html(ids, enc), summary, ", ".join(map(str, ids)), _token_table(ids, enc)


_ID_SEPARATORS = re.compile(r"[\s,;\[\]()]+")


def parse_ids(text: str) -> list[int]:
    """``"15496, 11 314"`` (commas, spaces or a Python/JSON list) → ids; gr.Error naming the bad item."""
    text = _check_text(text, "list of ids")
    items = [t for t in _ID_SEPARATORS.split(text) if t]
    if not items:
        raise _error("Type token ids separated by commas or spaces, e.g. 15496, 11, 314, 716.")
    ids, n_vocab = [], get_encoding().n_vocab
    for k, item in enumerate(items):
        if not re.fullmatch(r"[+-]?\d+", item):
            raise _error(f"Item {k + 1} ({item[:20]!r}) is not a whole number: ids are integers 0 … {n_vocab - 1}.")
        value = int(item)
        if not 0 <= value < n_vocab:
            raise _error(f"Item {k + 1} ({value}) is outside the GPT-2 vocabulary: ids run from 0 to {n_vocab - 1}.")
        ids.append(value)
    return ids


def detokenize(ids_text: str) -> tuple[str, str]:
    """Ids → (decoded text, chips HTML). Bytes that are not valid UTF-8 alone decode to �
    in the text; the chips show them as bytes."""
    ids = parse_ids(ids_text)
    enc = get_encoding()
    return enc.decode(ids), chips_html(ids, enc)


# --------------------------------------------------------------------------- generate view

HEATMAP_HEIGHT, GRID_HEIGHT, TOPK_HEIGHT, LENS_HEIGHT = 520, 720, 380, 500


def _lens_height(n_layers: int) -> int:
    """Room for two lines of text per block (taller for the larger GPT-2s)."""
    return max(LENS_HEIGHT, 170 + 28 * n_layers)


def _prompt_ids(prompt: str | None) -> list[int]:
    prompt = _check_text(prompt, "prompt")
    if not prompt:
        raise _error("The prompt is empty: type at least one character, e.g. “Hello, I am”.")
    ids = encode(prompt, get_encoding())
    if len(ids) > MAX_PROMPT_TOKENS:
        raise _error(f"The prompt is {len(ids):,} tokens long; the limit is {MAX_PROMPT_TOKENS:,} tokens.")
    return ids


def _session(v: Visitor, prompt: str | None) -> GenerationSession:
    """The visitor's session for this prompt: the current one, or a new one if the prompt
    changed or none exists yet. Call with ``v.lock`` held."""
    ids = _prompt_ids(prompt)
    if v.session is None or v.session.prompt_ids != ids:
        model, enc = _model_of(v), get_encoding()
        if model.cfg.vocab_size != enc.n_vocab:
            raise _error(f"This model's vocab_size is {model.cfg.vocab_size:,}; generating with the GPT-2 "
                         f"tokenizer needs {enc.n_vocab:,}. Build a model with vocab_size {enc.n_vocab}.")
        v.session = GenerationSession(model, enc, ids, top_k=TOP_K, attn_window=ATTN_WINDOW)
    return v.session


def _index(value: Any, size: int) -> int:
    """A layer or head index from a UI control, clamped into ``0 … size-1``."""
    try:
        return min(max(int(value), 0), size - 1)
    except (TypeError, ValueError):
        return 0


def _text_html(v: Visitor) -> str:
    """The growing text: prompt chips, then generated chips (the newest outlined)."""
    s = v.session
    ids, n_prompt, ctx = s.ids, len(s.prompt_ids), s.model.cfg.context_length
    legend = (f'<div class="legend"><span class="chip">prompt</span> <span class="chip gen">generated</span> '
              f"&nbsp;{n_prompt} prompt + {len(s.steps)} generated tokens")
    if len(ids) > ctx:
        legend += f" · dimmed tokens lie outside the model's context of {ctx}"
    return chips_html(ids, generated_from=n_prompt, unseen_before=max(0, len(ids) - ctx)) + legend + "</div>"


def _kv_readout(v: Visitor) -> str:
    """What the KV cache holds and the work the last step saved."""
    s = v.session
    cfg, size = s.model.cfg, s.model.dtype.itemsize
    per_token = 2 * cfg.n_layers * cfg.emb_dim * size
    formula = (f"2 (K, V) × {cfg.n_layers} blocks × {cfg.n_heads} heads × {cfg.head_dim} dims × {size} B "
               f"= {per_token:,} B per token")
    if not s.steps and s.cache_tokens:  # back at the prompt after Reset: the prompt's keys and values stay
        return (f"**KV cache:** {s.cache_tokens:,} prompt tokens cached = {s.cache_tokens * per_token / 1e6:,.2f} MB; "
                f"the next Step reuses them.  \n{formula}")
    if not s.steps:
        return (f"**KV cache:** empty. The first Step runs the {len(s.ids)} prompt tokens through the model "
                f"(a prefill) and keeps their keys and values; every later Step computes 1 position.  \n{formula}")
    r = s.steps[-1]
    if r.positions_computed < r.context_len:
        plural = "s" if r.positions_computed > 1 else ""
        work = (f"**This step computed {r.positions_computed} position{plural} instead of {r.context_len}**: the "
                f"other {r.context_len - r.positions_computed} came from the cache.")
    elif r.cropped:
        work = (f"**This step computed all {r.positions_computed} positions**: the text overflows the context, "
                "cropping shifts every position, so cached keys and values no longer fit (the source recomputes "
                "every step).")
    else:
        work = f"**This step computed all {r.positions_computed} positions** (a prefill: there was no cache to reuse)."
    return (f"**KV cache:** {r.cache_tokens:,} tokens cached = {r.cache_tokens * per_token / 1e6:,.2f} MB of keys "
            f"and values ({r.cache_bytes / 1e6:,.2f} MB allocated, grown in chunks) · {formula}  \n"
            f"{work} Step time {r.ms:.0f} ms.")


def _topk_figure(v: Visitor) -> go.Figure:
    s = v.session
    if not s.steps:
        return plots.empty_figure("Press Step to see the next-token candidates", height=TOPK_HEIGHT)
    r, enc = s.steps[-1], get_encoding()
    read = _label(s.ids[r.position - 1], enc, 20)
    return plots.topk_figure(
        [_label(c.token_id, enc, 20) for c in r.candidates], [c.prob for c in r.candidates],
        [c.token_id for c in r.candidates], chosen=0, height=TOPK_HEIGHT,
        title=f"Step {len(s.steps)}: after “{read}” the model picks “{_label(r.token_id, enc, 20)}”",
    )


@dataclass(frozen=True)
class _Attention:
    """One layer's attention over the displayed window, ready to plot."""

    layer: int
    weights: torch.Tensor  # (n_heads, W, W), row = query, column = key
    positions: list[int]  # absolute positions of the W tokens
    labels: list[str]  # their display pieces
    span: str  # "tokens 0–14", for titles


def _attention(v: Visitor, layer: int) -> _Attention:
    weights, positions = v.session.attention(layer, ATTN_WINDOW)
    ids = v.session.ids
    span = f"tokens {positions[0]}–{positions[-1]}" + (f" (last {len(positions)})" if positions[0] > 0 else "")
    span += f", read by step {len(v.session.steps)}" if v.session.steps else ", the prompt"
    return _Attention(layer, weights.float().cpu(), positions, [_label(ids[p]) for p in positions], span)


def _heatmap(a: _Attention, head: int) -> go.Figure:
    return plots.attention_figure(a.weights[head], a.labels, a.positions, height=HEATMAP_HEIGHT,
                                  title=f"Block {a.layer}, head {head} · {a.span}")


def _layer_figures(a: _Attention) -> tuple[go.Figure, go.Figure]:
    """(head average, all-heads grid) of one layer."""
    n_heads = a.weights.shape[0]
    avg = plots.attention_figure(a.weights.mean(0), a.labels, a.positions, height=HEATMAP_HEIGHT,
                                 title=f"Block {a.layer}, average of {n_heads} heads · {a.span}")
    grid = plots.attention_grid_figure(a.weights, a.labels, a.positions, height=GRID_HEIGHT,
                                       title=f"Block {a.layer}: all {n_heads} heads · {a.span}")
    return avg, grid


def _layer_head(v: Visitor, layer: Any, head: Any) -> tuple[int, int]:
    cfg = v.session.model.cfg
    return _index(layer, cfg.n_layers), _index(head, cfg.n_heads)


def _generation_view(v: Visitor, layer: Any, head: Any) -> tuple[str, go.Figure, go.Figure, str, dict]:
    """(text, top-k chart, heatmap, KV readout, raw step data) after an action."""
    layer, head = _layer_head(v, layer, head)
    return _text_html(v), _topk_figure(v), _heatmap(_attention(v, layer), head), _kv_readout(v), _step_data(v)


def _step_data(v: Visitor) -> dict:
    """Everything a step produced, as plain data (the API's view of the session)."""
    s = v.session
    data: dict[str, Any] = dict(model=v.spec.label, ids=s.ids, prompt_tokens=len(s.prompt_ids), text=s.text,
                                steps=len(s.steps))
    if s.steps:
        r = s.steps[-1]
        data["last_step"] = dict(
            token_id=r.token_id, piece=r.piece, cropped=r.cropped, context_len=r.context_len,
            positions_computed=r.positions_computed, cache_tokens=r.cache_tokens, cache_bytes=r.cache_bytes,
            ms=round(r.ms, 2), candidates=[[c.token_id, c.piece, round(c.prob, 6)] for c in r.candidates],
            lens=[[e.layer, e.token_id, e.piece, round(e.prob, 6)] for e in r.lens],
        )
    return data


def _lens_figure(v: Visitor) -> go.Figure:
    s, enc = v.session, get_encoding()
    if not s.steps:
        return plots.empty_figure("Press Step to see what every block would predict (logit lens)",
                                  height=LENS_HEIGHT)
    first = max(0, len(s.steps) - LENS_STEPS)
    steps = s.steps[first:]
    read = [_label(s.ids[r.position - 1], enc, 10) for r in steps]
    return plots.logit_lens_figure(
        [[_label(e.token_id, enc, 24) for e in r.lens] for r in steps], [[e.prob for e in r.lens] for r in steps],
        read, height=_lens_height(len(steps[-1].lens)),
        title=f"Logit lens: each block's top-1 next token, steps {first + 1}–{len(s.steps)}",
    )


def _blank_view(message: str) -> tuple[str, go.Figure, go.Figure, str, dict, go.Figure, go.Figure, go.Figure]:
    """Every generation output reset to a placeholder (no session yet, or the model changed)."""
    note = f'<div class="chips note">{_esc(message)}</div>'
    empty = plots.empty_figure(message, height=HEATMAP_HEIGHT)
    return (note, plots.empty_figure(message, height=TOPK_HEIGHT), empty, "", {},
            empty, plots.empty_figure(message, height=GRID_HEIGHT), plots.empty_figure(message, height=LENS_HEIGHT))


def _step_once(v: Visitor, prompt: str | None) -> None:
    """One greedy token for the visitor (``v.lock`` held); warns once when cropping starts."""
    s = _session(v, prompt)
    if len(s.ids) >= MAX_SESSION_TOKENS:
        raise _error(f"This session has {len(s.ids):,} tokens; the limit is {MAX_SESSION_TOKENS:,}. "
                     "Press Reset to start again from the prompt.")
    s.step(1)
    if s.steps[-1].cropped and (len(s.steps) == 1 or not s.steps[-2].cropped):
        ctx = s.model.cfg.context_length
        gr.Warning(f"The text is now longer than the model's context ({ctx} tokens): each step sees only the "
                   f"last {ctx} tokens, as the source's generate_text_simple crops.")


def step(prompt: str, layer: Any, head: Any, state: Visitor | None):
    """One greedy token. Returns (text, top-k, heatmap, KV readout, step data, state)."""
    v = _visitor(state)
    with v.lock:
        _step_once(v, prompt)
        return (*_generation_view(v, layer, head), v)


def _steps_count(n: Any) -> int:
    try:
        count = int(n)
    except (TypeError, ValueError):
        raise _error(f"Step ×N needs a whole number of steps, got {n!r}.") from None
    if not 1 <= count <= MAX_STEPS_PER_CLICK:
        raise _error(f"Step ×N takes 1 to {MAX_STEPS_PER_CLICK} steps per click, got {count}.")
    return count


def step_n(prompt: str, n: Any, layer: Any, head: Any, state: Visitor | None) -> Iterator[tuple]:
    """N greedy tokens, yielding the view after each (streamed to the browser)."""
    count, v = _steps_count(n), _visitor(state)
    for _ in range(count):
        with v.lock:
            _step_once(v, prompt)
            view = _generation_view(v, layer, head)
        yield (*view, v)


def undo(layer: Any, head: Any, state: Visitor | None):
    """Remove the last generated token (a warning, nothing else, at the start)."""
    v = _visitor(state)
    with v.lock:
        if v.session is None or not v.session.steps:
            gr.Warning("Nothing to undo: only the prompt is left.")
            return (*(gr.skip(),) * 5, v)
        v.session.undo()
        return (*_generation_view(v, layer, head), v)


def reset(prompt: str, layer: Any, head: Any, state: Visitor | None):
    """Back to the prompt (the prompt box's current text)."""
    v = _visitor(state)
    with v.lock:
        s = _session(v, prompt)
        s.reset()
        return (*_generation_view(v, layer, head), v)


def details(layer: Any, state: Visitor | None):
    """(head average, all-heads grid, logit lens): drawn after the main view of each action."""
    v = _visitor(state)
    if v.session is None:
        return gr.skip(), gr.skip(), gr.skip()
    with v.lock:
        return (*_layer_figures(_attention(v, _layer_head(v, layer, 0)[0])), _lens_figure(v))


def attention(layer: Any, head: Any, state: Visitor | None):
    """The chosen layer and head changed: (heatmap, head average, all-heads grid)."""
    v = _visitor(state)
    if v.session is None:
        return gr.skip(), gr.skip(), gr.skip()
    with v.lock:
        layer, head = _layer_head(v, layer, head)
        a = _attention(v, layer)
        return _heatmap(a, head), *_layer_figures(a)


# --------------------------------------------------------------------------- parameters view


PARAMS_CHART_HEIGHT = 560
#: Columns of the breakdown shown on the page (the formula carries the shapes), with their widths.
BREAKDOWN_COLUMNS = {"component": "13%", "module": "18%", "formula": "19%", "params each": "10%", "×": "4%",
                     "total": "11%", "% of model": "8%", "note": "17%"}


def _preset_name(cfg: GPTConfig) -> str:
    return next((name for name, c in PRESETS.items() if c == cfg), CUSTOM)


def _params_view(cfg: GPTConfig) -> tuple[str, str, pd.DataFrame, go.Figure, pd.DataFrame]:
    """(total, preset name, breakdown table, chart, memory and FLOPs table) of a configuration."""
    total = count_params(cfg)
    near = nearest_preset(cfg)
    mem = memory_and_compute(cfg)
    name = _preset_name(cfg)
    what = "the source's GPT_CONFIG_124M" if name == "seed-124M" else name if name != CUSTOM else "custom"
    summary = (
        f"## {total:,} parameters\n"
        f"{what} · nearest released GPT-2: **{near.name}** ({near.params:,}; this is {near.ratio:.2f}×) · "
        f"weights {mem.loc['weights_fp32', 'readable']} in fp32, {mem.loc['weights_bf16', 'readable']} in bf16 · "
        f"{mem.loc['flops_token_with_head', 'readable']} per token forward"
    )
    table = format_breakdown(param_breakdown(cfg))[list(BREAKDOWN_COLUMNS)]
    memory = mem[["quantity", "readable", "formula"]].rename(columns={"readable": "value"})
    return summary, name, table, plots.params_figure(cfg, height=PARAMS_CHART_HEIGHT), memory


def params(vocab_size: Any, context_length: Any, emb_dim: Any, n_heads: Any, n_layers: Any, drop_rate: Any,
           qkv_bias: Any, tie_weights: Any):
    """Any configuration → (total, preset, table, chart, memory). An invalid field gives a
    warning naming it and keeps the last valid result on screen."""
    try:
        cfg = config_from_fields(vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias,
                                 tie_weights)
        return _params_view(cfg)
    except ValueError as e:
        gr.Warning(f"Invalid configuration: {e}. The last valid result stays on screen.", duration=5)
        return (gr.skip(),) * 5


def preset(name: str):
    """A preset chosen → its eight field values, then the same outputs as :func:`params`."""
    if name not in PRESETS:
        if name == CUSTOM:
            return (gr.skip(),) * (len(CONFIG_FIELDS) + 5)
        raise _error(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    cfg = PRESETS[name]
    return (*(getattr(cfg, f) for f in CONFIG_FIELDS), *_params_view(cfg))


# --------------------------------------------------------------------------- model view


def model_card(state: Visitor | None) -> str:
    """The visitor's model: source, size, device, dtype and configuration (Markdown)."""
    spec = _visitor(state).spec
    loaded = spec in MODELS
    model = MODELS.get(spec) if loaded else None
    cfg = model.cfg if model is not None else spec.cfg or PRESETS.get(spec.source)
    if spec.source == RANDOM:
        origin = f"random initialisation, `torch.manual_seed({SEED})` before `GPTModel(cfg)` (as the source)"
    elif is_allowed_name(spec.source):
        origin = f"released GPT-2 weights, Hugging Face Hub `openai-community/{spec.source}`"
    else:
        origin = "a local checkpoint chosen by the operator"
    rows = [("weights", origin), ("device", str(model.device if model is not None else select_device())),
            ("dtype", spec.dtype), ("status", "loaded" if loaded else "loads on the first Step")]
    if cfg is not None:
        size = estimated_bytes(cfg, DTYPES[spec.dtype])
        rows += [("parameters", f"{count_params(cfg):,}"), ("memory for weights", f"{size / 1e9:.2f} GB")]
        rows.append(("config", " · ".join(f"`{f}={getattr(cfg, f)}`" for f in CONFIG_FIELDS)))
    table = "\n".join(f"| {k} | {val} |" for k, val in rows)
    return f"### {spec.label}\n\n| property | value |\n|---|---|\n{table}\n"


def _use_model(v: Visitor, spec: ModelSpec, progress: gr.Progress | None) -> tuple:
    """Switch the visitor to ``spec`` after the memory check (keeping the old model on failure)."""
    size, limit = spec.weight_bytes(), max_model_bytes()
    if size is not None and size > limit:
        raise _error(f"{spec.label} needs {size / 1e9:.2f} GB for its weights; this app allows "
                     f"{limit / 1e9:.2f} GB (GPTVIZ_MAX_MODEL_BYTES). Choose bfloat16 or a smaller model.")
    if progress is not None:
        progress(0, desc=f"Loading {spec.label} …")
    try:
        model = MODELS.get(spec)
    except WeightsError as e:
        raise _error(f"Could not load {spec.label}: {e}. The previous model stays in use.") from None
    with v.lock:
        v.spec, v.session = spec, None
    cfg = model.cfg
    gr.Info(f"Now using {spec.label}: press Step on the Generate tab.")
    return (
        model_card(v),
        gr.Slider(maximum=max(1, cfg.n_layers - 1), value=0),  # a slider needs maximum > minimum
        gr.Slider(maximum=max(1, cfg.n_heads - 1), value=0),
        *_blank_view(f"Model changed to {spec.label}: press Step"),
        v,
    )


def _dtype(dtype: Any) -> str:
    if dtype not in DTYPES:
        raise _error(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    return dtype


def load_weights(choice: str, dtype: str, state: Visitor | None, progress: gr.Progress = gr.Progress(track_tqdm=True)):
    """The weights selector: random (seed 123, seed-124M) or a released GPT-2, in a dtype."""
    if choice == RANDOM:
        spec = ModelSpec(RANDOM, PRESETS["seed-124M"], _dtype(dtype))
    elif is_allowed_name(choice):
        spec = ModelSpec(choice, None, _dtype(dtype))
    else:
        raise _error(f"Unknown weights {choice!r}: choose one of {', '.join(v for _, v in WEIGHT_CHOICES)}.")
    return _use_model(_visitor(state), spec, progress)


def build_custom(vocab_size: Any, context_length: Any, emb_dim: Any, n_heads: Any, n_layers: Any, drop_rate: Any,
                 qkv_bias: Any, tie_weights: Any, dtype: str, state: Visitor | None,
                 progress: gr.Progress = gr.Progress()):
    """Random weights (seed 123) for the Parameters view's configuration, within the memory limit."""
    try:
        cfg = config_from_fields(vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias,
                                 tie_weights)
    except ValueError as e:
        raise _error(f"Invalid configuration on the Parameters tab: {e}.") from None
    if cfg.vocab_size != get_encoding().n_vocab:
        raise _error(f"vocab_size must be {get_encoding().n_vocab} to generate with the GPT-2 tokenizer "
                     f"(the Parameters tab has {cfg.vocab_size:,}).")
    return _use_model(_visitor(state), ModelSpec(RANDOM, cfg, _dtype(dtype)), progress)


# --------------------------------------------------------------------------- the page

THEME = gr.themes.Soft(
    primary_hue="indigo", secondary_hue="teal", neutral_hue="slate",
    font=("ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"),
    font_mono=("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"),
)
CSS = """
.gradio-container { max-width: 1500px !important; }
#header h1 { margin-bottom: 0; }
#params-total h2 { margin: 0 0 4px 0; }
/* Redrawing one plot must not re-lay-out the whole page (plotly measures text many times). */
#heatmap, #heatmap-avg, #heads-grid, #lens-plot, #topk-plot, #params-chart { contain: layout style paint; }
/* Below the fold: skip rendering work until scrolled into view. */
#heads-grid, #lens-plot { content-visibility: auto; contain-intrinsic-size: auto 720px; }
"""
#: Arguments for ``demo.launch``: Gradio 6 takes the theme and CSS there. No run history: the
#: browser would store every step's figures and each click would grow slower (~10 → 170 ms
#: before the request leaves the page after 40 steps).
LAUNCH_KWARGS: dict[str, Any] = dict(theme=THEME, css=CSS, run_history=False)

TOKENIZER_EXAMPLE = "Hello, I am learning how GPT-2 reads text 🦜\n\tCafé, 日本語, tabs and  spaces<|endoftext|>"
#: Events that run a model share one worker: on a CPU, torch already uses every core for one step,
#: and two steps at once only slow each other down.
MODEL_EVENT = dict(concurrency_id="model", concurrency_limit=1, show_progress="hidden")


def _preload() -> None:
    """Build the start-up model in the background so the first Step does not wait for it."""
    try:
        MODELS.get(default_spec())
    except Exception as e:  # reported to the visitor on first use; the app keeps serving
        print(f"gptviz: could not preload {default_spec().label}: {e}")


def build_demo(preload: bool = True) -> gr.Blocks:
    """The explorer's Blocks (queue configured). ``preload`` starts building the start-up model."""
    if preload:
        threading.Thread(target=_preload, name="gptviz-preload", daemon=True).start()
    cfg0 = default_spec().cfg or PRESETS.get(default_spec().source) or PRESETS["gpt2"]
    blank = _blank_view("Press Step to generate the next token")
    with gr.Blocks(title="gptviz: GPT-2 from the inside") as demo:
        state = gr.State(None, time_to_live=SESSION_TTL_S)
        gr.Markdown("# gptviz · GPT-2 from the inside\nSee the tokens, step through greedy generation one token "
                    "at a time with attention and logit lens, and count the parameters of any configuration.",
                    elem_id="header")
        with gr.Tabs(elem_id="tabs"):
            # ---------------------------------------------------------------- tokenizer
            with gr.Tab("Tokenizer", id="tokenizer", elem_id="tab-tokenizer"):
                chips0, stats0, ids0, table0 = tokenize(TOKENIZER_EXAMPLE)
                with gr.Row():
                    with gr.Column(scale=3):
                        tok_in = gr.Textbox(TOKENIZER_EXAMPLE, lines=3, max_lines=8, label="Text",
                                            elem_id="tokenize-input",
                                            info="<|endoftext|> typed here becomes the special token 50256")
                        tok_btn = gr.Button("Tokenize", variant="primary", elem_id="tokenize-btn")
                    with gr.Column(scale=2):
                        tok_stats = gr.Markdown(stats0, elem_id="token-stats")
                        tok_ids = gr.Textbox(ids0, label="Token ids", lines=2, max_lines=4, interactive=False,
                                             elem_id="token-ids", buttons=["copy"])
                tok_chips = gr.HTML(chips0, css_template=CHIP_CSS, elem_id="token-chips", padding=True)
                with gr.Row():
                    with gr.Column(scale=3):
                        tok_table = gr.Dataframe(table0, label="Tokens: id, piece (· space, ↵ newline), UTF-8 bytes",
                                                 interactive=False, max_height=360, elem_id="token-table",
                                                 column_widths=["12%", "14%", "28%", "30%", "16%"])
                    with gr.Column(scale=2):
                        detok_in = gr.Textbox("15496, 11, 314, 716", label="Ids → text", elem_id="detokenize-input",
                                              info="ids separated by commas or spaces")
                        detok_btn = gr.Button("Decode", elem_id="detokenize-btn")
                        detok_out = gr.Textbox(label="Decoded text", interactive=False, elem_id="detokenize-output")
                        detok_chips = gr.HTML("", css_template=CHIP_CSS, elem_id="detokenize-chips")
            # ---------------------------------------------------------------- generate
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row(equal_height=True):
                    prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", scale=4, elem_id="gen-prompt",
                                        info="editing the prompt starts a new session at the next Step")
                    n_steps = gr.Slider(1, MAX_STEPS_PER_CLICK, value=8, step=1, label="N for Step ×N", scale=2,
                                        elem_id="stepn-count")
                with gr.Row():
                    step_btn = gr.Button("Step", variant="primary", elem_id="step-btn")
                    stepn_btn = gr.Button("Step ×N", elem_id="stepn-btn")
                    undo_btn = gr.Button("Undo", elem_id="undo-btn")
                    reset_btn = gr.Button("Reset", elem_id="reset-btn")
                with gr.Row():
                    with gr.Column(scale=3):
                        preview = chips_html(encode(DEFAULT_PROMPT)) + \
                            '<div class="legend">the prompt, as tokens · press Step to generate the next one</div>'
                        gen_text = gr.HTML(preview, css_template=CHIP_CSS, elem_id="gen-text", padding=True,
                                           min_height=120)
                        kv = gr.Markdown(blank[3], elem_id="kv-readout")
                    with gr.Column(scale=2):
                        topk = gr.Plot(blank[1], show_label=False, elem_id="topk-plot")
                with gr.Row():
                    layer = gr.Slider(0, max(1, cfg0.n_layers - 1), value=0, step=1, label="Block (layer)",
                                      elem_id="layer-slider")
                    head = gr.Slider(0, max(1, cfg0.n_heads - 1), value=0, step=1, label="Head",
                                     elem_id="head-slider")
                with gr.Row():
                    heatmap = gr.Plot(blank[2], show_label=False, elem_id="heatmap")
                    heatmap_avg = gr.Plot(blank[5], show_label=False, elem_id="heatmap-avg")
                grid = gr.Plot(blank[6], show_label=False, elem_id="heads-grid")
                lens = gr.Plot(blank[7], show_label=False, elem_id="lens-plot")
                with gr.Accordion("Raw data of the last step (what the step API returns)", open=False):
                    step_json = gr.JSON(blank[4], elem_id="step-json", show_label=False)
            # ---------------------------------------------------------------- parameters
            with gr.Tab("Parameters", id="parameters", elem_id="tab-parameters"):
                p0 = _params_view(PRESETS["seed-124M"])
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        preset_dd = gr.Dropdown([*PRESETS, CUSTOM], value="seed-124M", label="Preset",
                                                elem_id="preset")
                        base = PRESETS["seed-124M"]
                        fields = []
                        for pair in (CONFIG_FIELDS[0:2], CONFIG_FIELDS[2:4], CONFIG_FIELDS[4:6]):
                            with gr.Row():
                                fields += [gr.Number(getattr(base, f), label=f, elem_id=f"cfg-{f}", precision=None,
                                                     min_width=120) for f in pair]
                        with gr.Row():
                            fields += [gr.Checkbox(getattr(base, f), label=f, elem_id=f"cfg-{f}")
                                       for f in CONFIG_FIELDS[6:]]
                    with gr.Column(scale=3):
                        p_total = gr.Markdown(p0[0], elem_id="params-total")
                        p_chart = gr.Plot(p0[3], show_label=False, elem_id="params-chart")
                p_table = gr.Dataframe(p0[2], label="Parameter breakdown (as the source counts them)",
                                       interactive=False, wrap=True, elem_id="params-table", max_height=900,
                                       column_widths=list(BREAKDOWN_COLUMNS.values()))
                p_memory = gr.Dataframe(p0[4], label="Memory and compute (batch 1)", interactive=False, wrap=True,
                                        elem_id="params-memory", column_widths=["30%", "12%", "58%"])
            # ---------------------------------------------------------------- model
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                with gr.Row():
                    with gr.Column(scale=2):
                        spec0 = default_spec()
                        weights = gr.Radio(WEIGHT_CHOICES, value=spec0.source if spec0.source in
                                           dict(WEIGHT_CHOICES).values() else RANDOM, label="Weights",
                                           elem_id="weights-choice")
                        dtype = gr.Radio(list(DTYPES), value="float32", label="dtype", elem_id="dtype-choice")
                        load_btn = gr.Button("Load these weights", variant="primary", elem_id="load-btn")
                        gr.Markdown(
                            f"Released weights download once from the Hugging Face Hub. A visitor may load or "
                            f"build up to **{max_model_bytes() / 1e9:.1f} GB** of weights "
                            "(gpt2-xl needs bfloat16 for that).", elem_id="model-note")
                        build_btn = gr.Button("Build random weights from the Parameters tab's configuration",
                                              elem_id="build-btn")
                    with gr.Column(scale=3):
                        card = gr.Markdown(model_card(Visitor(spec0)), elem_id="model-card")

        # ---------------------------------------------------------------- events
        main = [gen_text, topk, heatmap, kv, step_json, state]
        extra = [heatmap_avg, grid, lens]
        after = dict(fn=details, inputs=[layer, state], outputs=extra, api_visibility="private", **MODEL_EVENT)
        gr.on([tok_btn.click, tok_in.submit], tokenize, tok_in, [tok_chips, tok_stats, tok_ids, tok_table],
              api_name="tokenize")
        gr.on([detok_btn.click, detok_in.submit], detokenize, detok_in, [detok_out, detok_chips],
              api_name="detokenize")
        step_btn.click(step, [prompt, layer, head, state], main, api_name="step", **MODEL_EVENT).success(**after)
        stepn_btn.click(step_n, [prompt, n_steps, layer, head, state], main, api_name="step_n",
                        **MODEL_EVENT).success(**after)
        undo_btn.click(undo, [layer, head, state], main, api_name="undo", **MODEL_EVENT).success(**after)
        reset_btn.click(reset, [prompt, layer, head, state], main, api_name="reset", **MODEL_EVENT).success(**after)
        gr.on([layer.input, head.input], attention, [layer, head, state], [heatmap, heatmap_avg, grid],
              api_name="attention", trigger_mode="always_last", **MODEL_EVENT)
        p_outputs = [p_total, preset_dd, p_table, p_chart, p_memory]
        gr.on([f.input for f in fields], params, fields, p_outputs, api_name="params", trigger_mode="always_last",
              show_progress="hidden")
        preset_dd.input(preset, preset_dd, fields + p_outputs, api_name="preset", show_progress="hidden")
        switched = [card, layer, head, gen_text, topk, heatmap, kv, step_json, heatmap_avg, grid, lens, state]
        load_btn.click(load_weights, [weights, dtype, state], switched, api_name="load_model", concurrency_id="load",
                       concurrency_limit=1)
        build_btn.click(build_custom, fields + [dtype, state], switched, api_name="build_model",
                        concurrency_id="load", concurrency_limit=1)
        demo.load(model_card, state, card, api_visibility="private")  # on each page load: loaded yet? which device?
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo
