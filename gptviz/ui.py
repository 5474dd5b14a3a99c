"""The Gradio explorer: Tokenizer, Generate, Inside, Parameters and Model views.

Every event handler is a module-level function of plain values (plus the visitor's
:class:`Visitor` kept in ``gr.State``), so tests call them without a browser. Models are
shared read-only by all visitors through :data:`MODELS`, a small cache with a lock; a
visitor's own state is a :class:`Visitor`: the model it chose and its
:class:`~gptviz.generation.GenerationSession` (KV cache and step history, no model copy).

Named endpoints (``api_name``, usable from ``gradio_client``; one session per client):
``tokenize``, ``detokenize``, ``step``, ``step_n``, ``undo``, ``reset``, ``attention``,
``shapes``, ``kv_cache``, ``ablate``, ``precision``, ``params``, ``preset``, ``load_model``,
``build_model``.

Environment: ``GPTVIZ_WEIGHTS`` picks the model loaded at start (``random``: the source's
seed-124M configuration with seed 123, the default, works offline; ``gpt2`` …
``gpt2-xl``: the released weights from the Hub; any other value: a local checkpoint path,
for operators only). ``GPTVIZ_MAX_MODEL_BYTES`` caps the weights a visitor may build or
load (default 4 GB). ``GPTVIZ_DEVICE`` overrides the device.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import html
import inspect
import os
import re
import sys
import threading
import time
import weakref
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
from .inside import (ablate, cache_savings, compare_precision, forward_flops, kv_cache_table, low_precision_copy,
                     model_source, trace_shapes)
from .model import GPTModel, MultiHeadAttention
from .settings import select_device
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
MAX_LIVE_SESSIONS = 48  # generation sessions kept at once, each within the engine's 64 MB: <= ~3 GB
MAX_SESSIONS = 1_000  # Gradio's per-session records (~0.15 MB each), least recently used dropped
DEFAULT_PROMPT = "Hello, I am"
SEED = 123
DEFAULT_MAX_MODEL_BYTES = 4_000_000_000
RANDOM = "random"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOW_DTYPE = torch.bfloat16  # the Inside view compares float32 with this
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
    The Inside view's precision comparison keeps one low-precision copy per model here
    (:meth:`low_precision`), dropped with its model.
    """

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._models: OrderedDict[ModelSpec, Future] = OrderedDict()
        self._low: dict[ModelSpec, Future] = {}  # the bfloat16 copies, by the spec of their model

    def _once(self, table: dict, key: ModelSpec, make: Any) -> GPTModel:
        """``table[key]``: made by ``make()`` for the first caller; the others wait for it."""
        with self._lock:
            future = table.get(key)
            owner = future is None
            if owner:
                future = table[key] = Future()
        if owner:
            try:
                future.set_result(make())
            except BaseException as e:
                future.set_exception(e)
                with self._lock:
                    table.pop(key, None)
        return future.result()

    def get(self, spec: ModelSpec) -> GPTModel:
        model = self._once(self._models, spec, lambda: build_model(spec))
        with self._lock:
            if spec in self._models:
                self._models.move_to_end(spec)
            while len(self._models) > self.capacity:
                dropped, _ = self._models.popitem(last=False)
                self._low.pop(dropped, None)
        return model

    def low_precision(self, spec: ModelSpec) -> GPTModel:
        """A :data:`LOW_DTYPE` copy of the shared model of ``spec``, made once (at most one per
        model) and dropped when the model is."""
        model = self.get(spec)
        low = self._once(self._low, spec, lambda: low_precision_copy(model, LOW_DTYPE))
        with self._lock:
            if spec not in self._models:  # the model was dropped meanwhile: so is its copy
                self._low.pop(spec, None)
        return low

    def __contains__(self, spec: ModelSpec) -> bool:
        with self._lock:
            future = self._models.get(spec)
        return future is not None and future.done() and future.exception() is None


MODELS = ModelStore()


# --------------------------------------------------------------------------- per-visitor state


@dataclass(eq=False)  # compared by identity: visitors are counted in a WeakSet (_LIVE)
class Visitor:
    """One browser tab's state (in ``gr.State``): its chosen model and its generation session."""

    spec: ModelSpec = field(default_factory=lambda: default_spec())
    session: GenerationSession | None = None  # holds a reference to the shared model, never a copy
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one event at a time
    last_used: float = 0.0  # time.monotonic() of its last Step or Reset
    released: bool = False  # its session was dropped to make room for others (said at its next Step)

    @property
    def model(self) -> GPTModel:
        return MODELS.get(self.spec)


_LIVE: weakref.WeakSet[Visitor] = weakref.WeakSet()  # visitors that were given a generation session
_LIVE_LOCK = threading.Lock()


def _admit(v: Visitor) -> None:
    """Count ``v``'s new generation session. Beyond :data:`MAX_LIVE_SESSIONS`, the least recently
    used other visitors that are not busy drop theirs (its KV cache and history: the memory)."""
    with _LIVE_LOCK:
        _LIVE.add(v)
        others = sorted((u for u in _LIVE if u is not v and u.session is not None), key=lambda u: u.last_used)
        excess = len(others) + 1 - MAX_LIVE_SESSIONS
        for u in others:
            if excess <= 0:
                break
            if u.lock.acquire(blocking=False):  # a busy visitor keeps its session
                u.session, u.released = None, True
                u.lock.release()
                _LIVE.discard(u)
                excess -= 1


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _drop(state: Any) -> None:
    """A visitor's state is deleted (its tab closed, or SESSION_TTL_S passed): free its generation
    session now and hand freed memory back to the system. glibc keeps freed heap memory for reuse,
    so without ``malloc_trim`` the process would stay at its peak size after sessions end."""
    if isinstance(state, Visitor) and state.lock.acquire(blocking=False):  # a busy one goes with its state
        state.session = None
        state.lock.release()
    if hasattr(_LIBC, "malloc_trim"):  # glibc only
        _LIBC.malloc_trim(0)


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


_SURROGATES = re.compile("[\ud800-\udfff]")


def _check_text(text: str | None, what: str) -> str:
    """Visitor text within :data:`MAX_TEXT_CHARS`; lone UTF-16 surrogates (not characters, but
    the API's JSON can carry them) become U+FFFD with a warning."""
    text = text if isinstance(text, str) else "" if text is None else str(text)
    if len(text) > MAX_TEXT_CHARS:
        raise _error(f"The {what} is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,}. "
                     "Shorten it and try again.")
    text, n = _SURROGATES.subn("\ufffd", text)
    if n:
        gr.Warning(f"The {what} holds {n} unpaired UTF-16 surrogate{'s' if n > 1 else ''} (not Unicode characters); "
                   "each is read as U+FFFD �.")
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
        if not re.fullmatch(r"[+-]?[0-9]+", item):
            raise _error(f"Item {k + 1} ({item[:20]!r}) is not a whole number: ids are integers 0 … {n_vocab - 1}.")
        value = int(item) if len(item) <= 12 else n_vocab  # int() refuses > 4,300 digits; any such is too large
        if not 0 <= value < n_vocab:
            raise _error(f"Item {k + 1} ({item[:20]}{'…' if len(item) > 20 else ''}) is outside the GPT-2 "
                         f"vocabulary: ids run from 0 to {n_vocab - 1}.")
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
        if v.released:
            v.released = False
            gr.Warning("Your generation session was the longest idle and was released to make room for other "
                       "visitors: it starts again from the prompt.")
        v.session = GenerationSession(model, enc, ids, top_k=TOP_K, attn_window=ATTN_WINDOW)
        _admit(v)
    v.last_used = time.monotonic()
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
    return (f"{_this_step(v)}\n\n"
            f"**KV cache:** {r.cache_tokens:,} tokens cached = {r.cache_tokens * per_token / 1e6:,.2f} MB of keys "
            f"and values ({r.cache_bytes / 1e6:,.2f} MB allocated, grown in chunks) · {formula}  \n"
            f"{work} Step time {r.ms:.0f} ms. The Inside tab shows the cache layer by layer.")


def _md_code(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _this_step(v: Visitor) -> str:
    """The last step in words: what it read and chose, the runner-up, and from which block on
    the logit lens already predicts the choice (Markdown)."""
    s = v.session
    r = s.steps[-1]
    chosen = next((c for c in r.candidates if c.token_id == r.token_id), None)
    text = f"**Step {len(s.steps)}** read {r.context_len} tokens and chose {_md_code(_label(r.token_id))}"
    if chosen is not None:
        text += f" (p = {plots.percent(chosen.prob)})"
    runner_up = next((c for c in r.candidates if c.token_id != r.token_id), None)
    if runner_up is not None:
        text += f", ahead of {_md_code(_label(runner_up.token_id))} ({plots.percent(runner_up.prob)})"
    if r.lens:
        first = len(r.lens)
        while first > 0 and r.lens[first - 1].token_id == r.token_id:
            first -= 1
        last = len(r.lens) - 1
        text += (". Logit lens: every block already predicts it" if first == 0 else
                 ". Logit lens: only the last block predicts it" if first >= last else
                 f". Logit lens: blocks {first}–{last} predict it")
    return text + "."


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
BREAKDOWN_COLUMNS = {"component": "15%", "module": "18%", "formula": "18%", "params each": "9%", "×": "4%",
                     "total": "9%", "% of model": "7%", "note": "20%"}


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


# --------------------------------------------------------------------------- inside view

#: The shape table's columns and widths; ``line`` is the line of gptviz/model.py a row comes from.
SHAPE_COLUMNS = {"module": "40%", "input": "24%", "output": "24%", "line": "12%"}
CODE_ABOVE, CODE_BELOW = 8, 15  # lines of source shown around the highlighted one
COMPARE_HEIGHT, KV_HEIGHT = 440, 320
DEFAULT_HEADS = "0.3, 5.1"
#: Column widths of the two-run top-k tables (ablation, precision): #, run a, p, p, run b, p.
PAIR_WIDTHS = ["6%", "25%", "13%", "17%", "25%", "14%"]
KV_COLUMNS = ["layer", "K shape", "V shape", "allocated shape", "filled", "allocated"]
KV_CURVE_POINTS = 64  # contexts at which the KV view's chart counts the work of a step

INSIDE_CSS = """
.about { font-size: 14px; color: #3b4252; line-height: 1.6; }
.about .tokens, .summary .tok { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
        background: #eef1f7; border-radius: 4px; padding: 0 4px; }
.about .tokens { white-space: pre-wrap; }
.summary .tok { white-space: pre; }
.summary { font-size: 14px; line-height: 1.6; color: #1f2430; }
.summary p { margin: 4px 0; }
.summary table { border-collapse: collapse; margin: 4px 0 8px 0; width: auto !important; border: none !important; }
.summary tr { border: none !important; }
.summary th, .summary td { border: none !important; border-bottom: 1px solid #e3e6ee !important;
        padding: 4px 18px 4px 0 !important; text-align: left; background: none !important; white-space: nowrap; }
.summary .yes { color: #0d8a6a; font-weight: 600; }
.summary .no { color: #b34; font-weight: 600; }
.code-head { font-size: 13px; color: #555c6b; margin: 0 0 6px 2px; }
.code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; line-height: 1.6;
        background: #f7f8fb; border: 1px solid #e3e6ee; border-radius: 8px; padding: 6px 0; overflow-x: auto;
        white-space: pre; color: #1f2430; }
.code .lines { display: inline-block; min-width: 100%; }
.code .row { min-height: 1.6em; padding-right: 12px; }
.code .row.hl { background: #FFE9A8; box-shadow: inset 4px 0 #d08a00; font-weight: 600; }
.code .ln { display: inline-block; width: 2.5em; margin-right: 0.8em; text-align: right; color: #9aa1ae; }
"""


@functools.cache
def _definitions() -> tuple[tuple[int, int, str], ...]:
    """(first line, last line, qualified name) of every class and function of gptviz/model.py."""
    source, first = model_source()
    found: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef)):
                found.append((child.lineno + first - 1, child.end_lineno + first - 1, prefix + child.name))
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source), "")
    return tuple(found)


def code_html(line: int) -> str:
    """gptviz/model.py around ``line`` with that line highlighted, headed by the class or
    function holding it (HTML, every text escaped)."""
    source, first = model_source()
    lines = source.splitlines()
    last = first + len(lines) - 1
    line = min(max(line, first), last)
    lo = max(first, min(line - CODE_ABOVE, last - CODE_ABOVE - CODE_BELOW))
    hi = min(last, lo + CODE_ABOVE + CODE_BELOW)
    where = max((d for d in _definitions() if d[0] <= line <= d[1]), key=lambda d: d[0], default=None)
    rows = "".join(f'<div class="row{" hl" if n == line else ""}"><span class="ln">{n}</span>'
                   f"{_esc(lines[n - first])}</div>" for n in range(lo, hi + 1))
    head = "<b>gptviz/model.py</b>" + (f" · {_esc(where[2])}" if where else "") + f" · line {line} highlighted"
    return f'<div class="code-head">{head}</div><div class="code"><div class="lines">{rows}</div></div>'


def _inside_input(v: Visitor, prompt: str | None) -> tuple[GPTModel, list[int], str]:
    """(model, the tokens the next Step reads, an HTML line saying which): the session's tokens
    if the session belongs to this prompt, else the prompt's; cropped to the context as a step is."""
    ids = _prompt_ids(prompt)
    model = _model_of(v)
    with v.lock:
        s = v.session
        generated = len(s.steps) if s is not None and s.prompt_ids == ids else 0
        if generated:
            ids = s.ids
    ctx = model.cfg.context_length
    read = ids[-ctx:]
    text = get_encoding().decode(read)
    tail = text if len(text) <= 160 else "…" + text[-159:]
    what = f"{len(ids) - generated} prompt + {generated} generated tokens" + \
        (f", the last {ctx} of them" if len(ids) > ctx else "")
    about = (f'<div class="about">Inside <b>{_esc(v.spec.label)}</b>, on the {len(read)} tokens the next Step reads '
             f'({what}): <span class="tokens">{_esc(tail)}</span></div>')
    return model, read, about


def _tree_names(table: pd.DataFrame) -> list[str]:
    """The tracer's module names as a tree: indented by nesting, without the parent's prefix
    (``trf_blocks.0.att.W_query`` under ``trf_blocks.0.att`` is ``W_query``); traced tensors
    and the numbered layers of a Sequential say what they are."""
    names, parents = [], []
    for depth, name, kind in zip(table["depth"], table["module"], table["kind"]):
        del parents[depth:]
        parent = parents[-1] if parents else ""
        inside_parent = parent and name.startswith(parent) and name[len(parent):len(parent) + 1] in (".", ":")
        short = name[len(parent) + 1:] if inside_parent else name
        parents.append(name)
        if kind == "traced tensor":
            short += " (tensor)"
        elif short.isdigit():
            short += f" ({kind})"
        names.append("\u00a0\u00a0" * depth + short)  # non-breaking spaces: the indent survives HTML
    return names


def shapes(prompt: str, expand: bool, state: Visitor | None) -> tuple[str, pd.DataFrame, str]:
    """The shape tracer on the tokens the next Step reads: (what is traced, every module call of
    a real forward pass in order with input → output shapes and the line of gptviz/model.py that
    made it, that source with the attention-scores line highlighted). ``expand``: every block
    in full, not only ``trf_blocks.0``."""
    v = _visitor(state)
    model, ids, about = _inside_input(v, prompt)
    table = trace_shapes(model, ids, collapse=not expand)
    shown = table[list(SHAPE_COLUMNS)].assign(module=_tree_names(table))
    scores = table.loc[table["module"].str.endswith(":attn_scores"), "line"]
    return about, shown, code_html(int(scores.iloc[0] if len(scores) else table["line"].iloc[0]))


def shape_line(evt: gr.SelectData) -> str:
    """A row of the shape table clicked: the source with that row's line highlighted."""
    try:
        return code_html(int(evt.row_value[list(SHAPE_COLUMNS).index("line")]))
    except (TypeError, ValueError, IndexError):
        return gr.skip()


def _heads_text(heads: tuple[tuple[int, int], ...], n_heads: int) -> str:
    """``block 0: all 12 heads; block 5: head 3``."""
    by_block: dict[int, list[int]] = {}
    for layer, head in heads:
        by_block.setdefault(layer, []).append(head)
    return "; ".join(f"block {b}: all {n_heads} heads" if len(hs) == n_heads else
                     f"block {b}: head{'s' if len(hs) > 1 else ''} {', '.join(map(str, hs))}"
                     for b, hs in sorted(by_block.items()))


def _tok(token_id: int) -> str:
    """A token for the Inside summaries (HTML)."""
    return f'<span class="tok">{_esc(_label(token_id, None, 20))}</span>'


def _pair_columns(a: str, b: str) -> list[str]:
    """Columns of a two-run top-k table: rank, run a's tokens and p, run b's p of those, run b's own."""
    return ["#", a, f"p {a}", f"p {b}, same token", b, f"p {b}"]


def _pair_table(t: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """A side-by-side top-k of :mod:`gptviz.inside` as shown: pieces with ids, probabilities in %."""
    def tokens(run: str) -> list[str]:
        return [f"{_label(i, None, 16)} ({i})" for i in t[f"{run} id"]]

    def pct(col: str) -> list[str]:
        return [plots.percent(p) for p in t[col]]

    values = [t["rank"], tokens(a), pct(f"{a} p"), pct(f"{b} p (same token)"), tokens(b), pct(f"{b} p")]
    return pd.DataFrame(dict(zip(_pair_columns(a, b), values)))


def ablation(prompt: str, heads: str, state: Visitor | None) -> tuple[str, pd.DataFrame, go.Figure]:
    """Switch attention heads off for the next token (``"0.3, 5.1"``: block.head; ``"L4H*"`` or
    ``"4.*"``: every head of block 4): (summary, top-k normal vs ablated, chart). The shared
    model is not modified: the heads' outputs are zeroed through the forward pass's head mask."""
    v = _visitor(state)
    spec = _check_text(heads, "list of heads").strip()
    if not spec:
        raise _error("Type the heads to switch off as block.head, e.g. 0.3, 5.1, or L4H* for every head of "
                     "block 4.")
    model, ids, _ = _inside_input(v, prompt)
    try:
        r = ablate(model, ids, spec, top_k=TOP_K)
    except ValueError as e:
        raise _error(f"{e}.") from None
    cfg = model.cfg
    normal, ablated = int(r.logits.argmax()), int(r.ablated_logits.argmax())
    verdict = (f'<span class="no">top-1 changed</span>: {_tok(normal)} → {_tok(ablated)}' if r.top1_changed else
               f'<span class="yes">top-1 unchanged</span>: {_tok(normal)}')
    summary = (f'<div class="summary"><p>Switched off <b>{len(r.heads)} of {cfg.n_layers * cfg.n_heads} heads</b> '
               f"({_esc(_heads_text(r.heads, cfg.n_heads))}): their outputs are zeroed before out_proj.</p>"
               f"<p>{verdict} · largest logit change <b>{r.max_logit_change:.4g}</b></p></div>")
    shown = r.table["normal id"].tolist()
    shown += [i for i in r.table["ablated id"].tolist()[:3] if i not in shown]  # the ablated run's favourites too
    p_normal, p_ablated = torch.softmax(r.logits.float(), -1), torch.softmax(r.ablated_logits.float(), -1)
    figure = plots.comparison_figure(
        [f"{_label(i, None, 16)}  ({i})" for i in shown], p_normal[shown].tolist(), p_ablated[shown].tolist(),
        names=("normal", "ablated"), height=COMPARE_HEIGHT,
        title=f"Next token, normal and with {len(r.heads)} head{'s' if len(r.heads) > 1 else ''} off")
    return summary, _pair_table(r.table, "normal", "ablated"), figure


def precision(prompt: str, state: Visitor | None) -> tuple[str, pd.DataFrame]:
    """The next token in float32 and in bfloat16: (summary: largest logit difference, top-1 and
    top-k agreement, ms per forward; top-k side by side). The bfloat16 copy is made once per
    shared model (:meth:`ModelStore.low_precision`), within the memory limit."""
    v = _visitor(state)
    model, ids, _ = _inside_input(v, prompt)
    if model.dtype != torch.float32:
        raise _error(f"This model runs in {v.spec.dtype}: load it in float32 on the Model tab to compare float32 "
                     "with bfloat16.")
    need, limit = estimated_bytes(model.cfg, torch.float32) + estimated_bytes(model.cfg, LOW_DTYPE), max_model_bytes()
    if need > limit:
        raise _error(f"Comparing precisions keeps a bfloat16 copy beside the model: {need / 1e9:.2f} GB in all; this "
                     f"app allows {limit / 1e9:.2f} GB (GPTVIZ_MAX_MODEL_BYTES).")
    repeats = max(1, min(3, 256 // len(ids)))  # timed forwards: fewer on long texts (a 1024-token one takes ~1 s)
    r = compare_precision(model, ids, low_model=MODELS.low_precision(v.spec), top_k=TOP_K, repeats=repeats)
    a, b = (str(d).removeprefix("torch.") for d in (r.reference_dtype, r.dtype))
    top_a, top_b = int(r.logits.argmax()), int(r.low_logits.argmax())
    p_a, p_b = torch.softmax(r.logits.float(), -1), torch.softmax(r.low_logits, -1)
    k = min(TOP_K, r.logits.numel())
    yes_no = {True: '<span class="yes">{}</span>', False: '<span class="no">{}</span>'}
    summary = (
        f'<div class="summary"><table><tr><th></th><th>{a}</th><th>{b}</th></tr>'
        f"<tr><td>top-1 next token</td><td>{_tok(top_a)} {plots.percent(float(p_a[top_a]))}</td>"
        f"<td>{_tok(top_b)} {plots.percent(float(p_b[top_b]))}</td></tr>"
        f"<tr><td>one forward over {len(ids)} tokens</td><td>{r.ms_reference:.1f} ms</td><td>{r.ms_low:.1f} ms</td>"
        f"</tr></table><p>Largest logit difference <b>{r.max_abs_diff:.4g}</b> · top-1 "
        + yes_no[r.top1_agree].format("agrees" if r.top1_agree else "differs")
        + f" · the top-{k} share " + yes_no[r.topk_agree].format(f"{r.topk_overlap} of {k}") + " tokens</p>"
        f"<p>bfloat16 keeps float32's range but only 8 significant bits (2–3 decimal digits): logits move "
        f"slightly, and candidates with nearly equal logits can swap places.</p></div>"
    )
    return summary, _pair_table(r.table, a, b)


def _bytes(n: int) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"


def _work_figure(cfg: GPTConfig, now: int) -> go.Figure:
    """FLOPs of one step with and without the KV cache at every context length (``now`` marked)."""
    contexts = sorted({*range(1, cfg.context_length + 1, max(1, cfg.context_length // KV_CURVE_POINTS)),
                       cfg.context_length, now})
    return plots.cache_work_figure(contexts, [forward_flops(cfg, 1, t) for t in contexts],
                                   [forward_flops(cfg, t, t) for t in contexts], now=now, height=KV_HEIGHT,
                                   title="Work of one step as the text grows")


def kv_cache(state: Visitor | None) -> tuple[str, pd.DataFrame, go.Figure]:
    """The visitor's KV cache: (what it holds and the work the last step saved against
    recomputing the whole context; per layer the shapes and bytes of its keys and values; the
    work of a step with and without the cache against the context length)."""
    v = _visitor(state)
    with v.lock:
        s = v.session
        cache = s.cache if s is not None else None
        if cache is None or not cache.length:
            if s is not None and s.steps and s.steps[-1].cropped:
                ctx = s.model.cfg.context_length
                note = (f"The text is longer than the context ({ctx} tokens): cropping shifts every position, so "
                        f"cached keys and values no longer fit; each step recomputes all {ctx} positions, as the "
                        "source does, and no cache is kept.")
                figure = _work_figure(s.model.cfg, ctx)
            else:
                note = ("The cache is empty: press Step on the Generate tab. The first step runs the prompt through "
                        "the model (a prefill) and keeps every layer's keys and values here.")
                figure = plots.empty_figure("Press Step on the Generate tab", height=KV_HEIGHT)
            return f'<div class="summary"><p>{note}</p></div>', pd.DataFrame(columns=KV_COLUMNS), figure
        cfg = s.model.cfg
        table = kv_cache_table(cache).rename(columns={"filled bytes": "filled", "allocated bytes": "allocated"})
        table[["filled", "allocated"]] = table[["filled", "allocated"]].map(_bytes)
        if s.steps:
            r = s.steps[-1]
            when, saved = f"Step {len(s.steps)}", cache_savings(cfg, r.context_len, r.positions_computed)
        else:  # back at the prompt, which stays cached
            when, saved = "The next Step", cache_savings(cfg, min(len(s.ids), cfg.context_length), 1)
        summary = (
            f'<div class="summary"><p><b>{cache.length} positions cached</b> in each of {cfg.n_layers} layers: keys '
            f"and values of shape (b, n_heads, T, head_dim) = (1, {cfg.n_heads}, {cache.length}, {cfg.head_dim}), "
            f"{_bytes(cache.used_bytes)} filled of {_bytes(cache.nbytes)} allocated (the cache grows in chunks of "
            f"{cache.layers[0].chunk} positions).</p><p><b>{when}</b>: {_esc(saved.explanation)}</p></div>"
        )
    return summary, table, _work_figure(cfg, saved.context_len)


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
/* Dense tables: smaller type and padding, so long tables fit a screen. */
.compact [role=gridcell], .compact [role=columnheader] { font-size: 12.5px; }
.compact [role=gridcell] .cell-wrap { padding: 4px 8px; line-height: 18px; min-height: 0; }
.compact [role=row] { min-height: 0; }
"""
#: Arguments for ``demo.launch``: Gradio 6 takes the theme and CSS there. No run history: the
#: browser would store every step's figures and each click would grow slower (~10 → 170 ms
#: before the request leaves the page after 40 steps).
#: No share link (a public tunnel) unless the operator asks; Gradio's per-session records bounded.
LAUNCH_KWARGS: dict[str, Any] = dict(theme=THEME, css=CSS, run_history=False, share=False,
                                     state_session_capacity=MAX_SESSIONS)

TOKENIZER_EXAMPLE = "Hello, I am learning how GPT-2 reads text 🦜\n\tCafé, 日本語, tabs and  spaces<|endoftext|>"
#: Events that run a model: up to MODEL_CONCURRENCY are admitted at once and take turns on
#: MODEL_LOCK, one unit of model work at a time (on a CPU torch already uses every core for one
#: step; two at once only slow each other down). A Step ×N takes a turn per step, so other
#: visitors' steps run in between instead of waiting for all N (measured with 8 visitors running
#: Step ×64: a single Step waits ~1.5 s instead of ~30 s).
MODEL_CONCURRENCY = 16
MODEL_EVENT = dict(concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY, show_progress="hidden")
MODEL_LOCK = threading.Lock()


def _take_turns(fn: Any) -> Any:
    """``fn`` run under :data:`MODEL_LOCK`; for a generator, each step under it (free in between)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            steps = fn(*args, **kwargs)
            while True:
                with MODEL_LOCK:
                    item = next(steps, StopIteration)
                if item is StopIteration:
                    return
                yield item
        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with MODEL_LOCK:
            return fn(*args, **kwargs)
    return call


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
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=_drop)
        gr.Markdown("# gptviz · GPT-2 from the inside\nSee the tokens, step through greedy generation one token "
                    "at a time with attention and logit lens, look inside the forward pass (shapes beside the code, "
                    "head ablation, precision, KV cache) and count the parameters of any configuration.",
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
                                                 column_widths=["13%", "11%", "27%", "26%", "23%"])
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
                with gr.Accordion("Raw data of the last step (what the step API returns)", open=False,
                                  elem_id="step-json-acc"):
                    step_json = gr.JSON(blank[4], elem_id="step-json", show_label=False)
            # ---------------------------------------------------------------- inside
            with gr.Tab("Inside", id="inside", elem_id="tab-inside") as inside_tab:
                inside_about = gr.HTML('<div class="about">The text of the Generate tab is traced when this tab '
                                       "opens.</div>", css_template=INSIDE_CSS, elem_id="inside-about")
                with gr.Row():
                    gr.Markdown("### Tensor shapes beside the code\nEvery module call of one real forward pass "
                                "(recorded by hooks), in order, with input → output shapes. Click a row to see the "
                                "line of `gptviz/model.py` that made it.", elem_id="shapes-intro")
                    expand = gr.Checkbox(False, label="Show every block, not only trf_blocks.0", scale=0,
                                         min_width=360, elem_id="shapes-expand")
                with gr.Row():
                    with gr.Column(scale=6):
                        shape_table = gr.Dataframe(pd.DataFrame(columns=list(SHAPE_COLUMNS)), interactive=False,
                                                   show_label=False, max_height=500, elem_id="shape-table",
                                                   elem_classes="compact", buttons=[],
                                                   column_widths=list(SHAPE_COLUMNS.values()))
                    with gr.Column(scale=7):
                        code = gr.HTML(code_html(model_source(MultiHeadAttention.forward)[1]),
                                       css_template=INSIDE_CSS, elem_id="model-code")
                gr.Markdown("### Head ablation\nSwitch attention heads off (their outputs zeroed before "
                            "`out_proj`) and compare the next-token candidates; the shared model is not modified.",
                            elem_id="ablate-intro")
                with gr.Row(equal_height=True):
                    heads_box = gr.Textbox(DEFAULT_HEADS, label="Heads to switch off", scale=4,
                                           elem_id="ablate-heads",
                                           info="block.head, e.g. 0.3, 5.1 (or L0H3); L4H* is every head of block 4")
                    ablate_btn = gr.Button("Switch off and compare", variant="primary", scale=1,
                                           elem_id="ablate-btn")
                with gr.Row():
                    with gr.Column(scale=5):
                        ablate_summary = gr.HTML("", css_template=INSIDE_CSS, elem_id="ablate-summary")
                        ablate_table = gr.Dataframe(pd.DataFrame(columns=_pair_columns("normal", "ablated")),
                                                    interactive=False, show_label=False, elem_id="ablate-table",
                                                    elem_classes="compact", wrap=True, buttons=[],
                                                    column_widths=PAIR_WIDTHS)
                    with gr.Column(scale=4):
                        ablate_plot = gr.Plot(plots.empty_figure("Press “Switch off and compare”",
                                                                 height=COMPARE_HEIGHT),
                                              show_label=False, elem_id="ablate-plot")
                gr.Markdown("### Precision: float32 and bfloat16\nThe same next-token prediction from the model "
                            "and from a bfloat16 copy of it (one copy per shared model, made on first use).",
                            elem_id="precision-intro")
                with gr.Row():
                    with gr.Column(scale=4):
                        precision_btn = gr.Button("Compare float32 and bfloat16", variant="primary",
                                                  elem_id="precision-btn")
                        precision_summary = gr.HTML("", css_template=INSIDE_CSS, elem_id="precision-summary")
                    with gr.Column(scale=5):
                        precision_table = gr.Dataframe(pd.DataFrame(columns=_pair_columns("float32", "bfloat16")),
                                                       interactive=False, show_label=False,
                                                       elem_id="precision-table", elem_classes="compact", wrap=True,
                                                       buttons=[], column_widths=PAIR_WIDTHS)
                gr.Markdown("### KV cache\nWhat the cache of your generation session holds, layer by layer, and "
                            "the work it saves.", elem_id="kv-intro")
                with gr.Row():
                    with gr.Column(scale=4):
                        kv_summary = gr.HTML("", css_template=INSIDE_CSS, elem_id="kv-summary")
                        kv_plot = gr.Plot(plots.empty_figure("Press Step on the Generate tab", height=KV_HEIGHT),
                                          show_label=False, elem_id="kv-plot")
                    with gr.Column(scale=5):
                        kv_table = gr.Dataframe(pd.DataFrame(columns=KV_COLUMNS), interactive=False,
                                                show_label=False, max_height=520, elem_id="kv-table",
                                                elem_classes="compact", buttons=[],
                                                column_widths=["9%", "19%", "19%", "21%", "15%", "17%"])
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
                                       interactive=False, wrap=True, elem_id="params-table", max_height=680,
                                       elem_classes="compact", column_widths=list(BREAKDOWN_COLUMNS.values()))
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
        gr.on([inside_tab.select, expand.input], shapes, [prompt, expand, state], [inside_about, shape_table, code],
              api_name="shapes", trigger_mode="always_last", **MODEL_EVENT).then(
            kv_cache, state, [kv_summary, kv_table, kv_plot], api_name="kv_cache", show_progress="hidden")
        shape_table.select(shape_line, None, code, api_visibility="private", show_progress="hidden")
        gr.on([ablate_btn.click, heads_box.submit], ablation, [prompt, heads_box, state],
              [ablate_summary, ablate_table, ablate_plot], api_name="ablate", **MODEL_EVENT)
        precision_btn.click(precision, [prompt, state], [precision_summary, precision_table], api_name="precision",
                            **MODEL_EVENT)
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

        def release(request: gr.Request) -> None:
            """A tab closed: delete its state now (Gradio would keep it an hour for a reconnect; a
            reloaded page is a new session anyway), which calls :func:`_drop`."""
            demo.state_holder.delete_state(request.session_hash)

        demo.unload(release)
    for fn in demo.fns.values():  # every model event, however registered, takes turns on MODEL_LOCK
        if fn.concurrency_id == MODEL_EVENT["concurrency_id"]:
            fn.fn = _take_turns(fn.fn)
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo
