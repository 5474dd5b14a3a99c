"""The lesson file format (``version`` 1) and the reading of untrusted lesson files:
:func:`load_lesson` parses, :func:`validate_lesson` checks and normalises.

The format::

    {"format": "gptviz-lesson", "version": 1,
     "title": "optional text",
     "model": {"kind": "random", "seed": 123, "config": {...the source's config dict...}}
              | {"kind": "hub", "name": "gpt2", "config": {...}}
              | {"kind": "custom", "label": "text shown to people", "config": {...}},
     "dtype": "float32" | "bfloat16" | "float16",
     "prompt_text": "Hello, I am",     # for people reading the file; replay uses prompt_ids
     "prompt_ids": [15496, 11, 314, 716],
     "generated_ids": [...],
     "sampling": {"temperature": 0.0, "sample_top_k": null, "seed": 123, "stop_at_eos": false, ...},
     "sampling_changes": [{"step": 3, "temperature": 0.8, "seed": 7}, ...],   # optional
     "views": {"tab": "generate", "layer": 5, "head": 1, "step": 6},
     "gptviz_version": "0.1.0"}

Security: :func:`load_lesson` treats its input as a visitor's upload. It reads a file only
when given a :class:`os.PathLike` (a ``str`` is always JSON text, never a path), caps the
size (:data:`MAX_LESSON_BYTES`, :data:`MAX_LESSON_TOKENS` tokens, short strings), refuses
unknown versions, unknown keys, NaN/Infinity, duplicate keys and wrong types, and raises
:class:`LessonError` (a ``ValueError``) for every one of them. No field is ever used as a
path, a module or code: the model source is data. :func:`~gptviz.files.lesson.model_for_lesson`
builds only the ``random`` kind (a seeded :class:`GPTModel` of the lesson's configuration,
within ``max_model_bytes``); for ``hub`` names the application decides whether the name is on
its allow-list (:func:`gptviz.files.weights.is_allowed_name`) and which model to pass to
:func:`~gptviz.files.lesson.replay`; ``custom`` models are never located from a lesson.

:mod:`gptviz.files.lesson` (export and replay) re-exports every public name here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..config import GPTConfig
from ..settings import DTYPES
from ..tokenizer import N_VOCAB
from .weights import PRETRAINED_NAMES, estimated_bytes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_LESSON_BYTES",
    "MAX_LESSON_TOKENS",
    "LessonError",
    "load_lesson",
    "validate_lesson",
]

FORMAT = "gptviz-lesson"
FORMAT_VERSION = 1
#: Largest lesson file read (bytes of JSON).
MAX_LESSON_BYTES = 512 * 1024
#: Prompt + generated tokens in one lesson (the app's ``Settings.max_session_tokens``).
MAX_LESSON_TOKENS = 2_048
#: Longest prompt_text (the app's ``Settings.max_text_chars``).
MAX_TEXT_CHARS = 20_000
#: Longest title, label, view value or other short string.
MAX_SHORT_CHARS = 200
#: Entries allowed in ``views`` and in ``sampling``.
MAX_ENTRIES = 32
#: Default limit on the weights :func:`model_for_lesson` builds (``Settings.max_model_bytes``).
DEFAULT_MAX_MODEL_BYTES = 4_000_000_000
#: Parameters of :class:`GenerationSession` that are display or memory options of the
#: replaying app, never taken from a lesson (plus every name starting with ``max_``).
SESSION_OPTIONS = frozenset({"self", "model", "enc", "prompt", "top_k", "attn_window", "logit_lens",
                             "max_retained_bytes"})
#: Sampling settings checked field by field (others must be plain JSON scalars).
KNOWN_SAMPLING = ("temperature", "sample_top_k", "top_p", "seed", "stop_at_eos")
MODEL_KINDS = ("random", "hub", "custom")
_TOP_KEYS = {"format", "version", "title", "model", "dtype", "prompt_text", "prompt_ids", "generated_ids",
             "sampling", "sampling_changes", "views", "gptviz_version"}
_REQUIRED = ("format", "version", "model", "dtype", "prompt_ids", "generated_ids", "sampling")
_MAX_SEED = 2**63 - 1
_MAX_TEMPERATURE = 1e6


class LessonError(ValueError):
    """A lesson that cannot be used: malformed, too large, an unknown version, or one that
    this model or this gptviz cannot replay. The message says which field and why."""


# --------------------------------------------------------------------------- validation


def _fail(where: str, why: str) -> LessonError:
    return LessonError(f"lesson {where}: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _short_str(v: Any, where: str, limit: int = MAX_SHORT_CHARS) -> str:
    if not isinstance(v, str):
        raise _fail(where, f"must be a string, got {type(v).__name__}")
    if len(v) > limit:
        raise _fail(where, f"is {len(v)} characters long, at most {limit} allowed")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(where, "holds a lone surrogate (not Unicode text)") from None
    return v


def _int_in(v: Any, where: str, lo: int, hi: int) -> int:
    if not _is_int(v):
        raise _fail(where, f"must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _fail(where, f"must be between {lo} and {hi}, got {v}")
    return v


def _check_config(raw: Any, dtype: str, max_model_bytes: int | None) -> GPTConfig:
    if not isinstance(raw, dict):
        raise _fail("model.config", f"must be an object (the source's configuration dict), got {type(raw).__name__}")
    try:
        cfg = GPTConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise _fail("model.config", str(e)) from None
    if cfg.vocab_size > 10 * N_VOCAB or cfg.context_length > 1 << 16:  # keeps the estimate below small
        raise _fail("model.config", "vocab_size or context_length far beyond GPT-2's")
    if max_model_bytes is not None:
        size = estimated_bytes(cfg, DTYPES[dtype])
        if size > max_model_bytes:
            raise _fail("model.config", f"describes a model of ~{size / 1e9:.2f} GB in {dtype}, "
                                        f"over the {max_model_bytes / 1e9:.2f} GB allowed")
    return cfg


def _check_model(raw: Any, dtype: str, max_model_bytes: int | None) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail("model", f"must be an object, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in MODEL_KINDS:
        raise _fail("model.kind", f"must be one of {', '.join(MODEL_KINDS)}, got {kind!r:.60}")
    allowed = {"random": {"kind", "seed", "config"}, "hub": {"kind", "name", "config"},
               "custom": {"kind", "label", "config"}}[kind]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail("model", f"unknown key(s) for kind {kind!r}: {', '.join(map(str, unknown))[:200]}")
    if "config" not in raw:
        raise _fail("model.config", "is missing")
    out: dict[str, Any] = {"kind": kind}
    if kind == "random":
        if "seed" not in raw:
            raise _fail("model.seed", "is missing")
        out["seed"] = _int_in(raw["seed"], "model.seed", 0, _MAX_SEED)
    elif kind == "hub":
        name = raw.get("name")
        if name not in PRETRAINED_NAMES:
            raise _fail("model.name", f"must be one of {', '.join(PRETRAINED_NAMES)}, got {name!r:.60}")
        out["name"] = name
    else:
        out["label"] = _short_str(raw.get("label", ""), "model.label")
    out["config"] = _check_config(raw["config"], dtype, max_model_bytes).to_dict()
    return out


def _check_ids(raw: Any, where: str, vocab: int, *, min_len: int, max_len: int) -> list[int]:
    if not isinstance(raw, list):
        raise _fail(where, f"must be a list of token ids, got {type(raw).__name__}")
    if not min_len <= len(raw) <= max_len:
        raise _fail(where, f"has {len(raw)} ids, {min_len} … {max_len} allowed (at most {MAX_LESSON_TOKENS} "
                           "tokens in a lesson)")
    for k, v in enumerate(raw):
        if not _is_int(v):
            raise _fail(f"{where}[{k}]", f"must be an integer token id, got {type(v).__name__}")
        if not 0 <= v < vocab:
            raise _fail(f"{where}[{k}]", f"token id {v} is outside the vocabulary (0 … {vocab - 1})")
    return list(raw)


def _check_sampling(raw: Any, vocab: int, name: str = "sampling", need_seed: bool = True,
                    skip: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail(name, f"must be an object, got {type(raw).__name__}")
    if len(raw) > MAX_ENTRIES:
        raise _fail(name, f"has {len(raw)} entries, at most {MAX_ENTRIES}")
    out: dict[str, Any] = {}
    for key, v in raw.items():
        where = f"{name}.{key}"
        _short_str(key, f"{name} key", 64)
        if key in skip:
            continue
        if key == "temperature":
            if not _is_number(v) or not 0 <= v <= _MAX_TEMPERATURE:
                raise _fail(where, f"must be a finite number >= 0 (0 = greedy), got {v!r:.60}")
            v = float(v)
        elif key == "sample_top_k":
            if v is not None:
                _int_in(v, where, 1, vocab)
        elif key == "top_p":
            if v is not None and (not _is_number(v) or not 0 < v <= 1):
                raise _fail(where, f"must be null or a number with 0 < top_p <= 1, got {v!r:.60}")
            v = None if v is None else float(v)
        elif key == "seed":
            _int_in(v, where, -_MAX_SEED, _MAX_SEED)
        elif key == "stop_at_eos":
            if not isinstance(v, bool):
                raise _fail(where, f"must be true or false, got {type(v).__name__}")
        elif key in SESSION_OPTIONS or key.startswith("max_") or key.startswith("_"):
            raise _fail(where, "is a display or memory option of the app, not a sampling setting")
        elif v is not None and not isinstance(v, (bool, str)) and not _is_number(v):
            raise _fail(where, f"must be a number, a boolean, a short string or null, got {type(v).__name__}")
        elif isinstance(v, str):
            _short_str(v, where)
        out[key] = v
    if need_seed and "seed" not in out:
        raise _fail(f"{name}.seed", "is missing")
    return out


def _check_changes(raw: Any, vocab: int, n_generated: int) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise _fail("sampling_changes", f"must be a list, got {type(raw).__name__}")
    if len(raw) > n_generated + 1:
        raise _fail("sampling_changes", f"has {len(raw)} entries for {n_generated} generated ids")
    out, last = [], -1
    for k, entry in enumerate(raw):
        where = f"sampling_changes[{k}]"
        if not isinstance(entry, dict):
            raise _fail(where, f"must be an object, got {type(entry).__name__}")
        if "step" not in entry:
            raise _fail(f"{where}.step", "is missing")
        step = _int_in(entry["step"], f"{where}.step", last + 1, n_generated)
        if "stop_at_eos" in entry:
            raise _fail(f"{where}.stop_at_eos", "is a setting of the whole session, not of a step")
        change = _check_sampling(entry, vocab, where, need_seed=False, skip=("step",))
        if not change:
            raise _fail(where, "changes nothing")
        out.append({"step": step, **change})
        last = step
    return out


def _check_views(raw: Any, cfg: GPTConfig, n_generated: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail("views", f"must be an object, got {type(raw).__name__}")
    if len(raw) > MAX_ENTRIES:
        raise _fail("views", f"has {len(raw)} entries, at most {MAX_ENTRIES}")
    limits = {"layer": cfg.n_layers - 1, "head": cfg.n_heads - 1, "step": n_generated}
    out: dict[str, Any] = {}
    for key, v in raw.items():
        where = f"views.{key}"
        _short_str(key, "views key", 64)
        if key in limits:
            _int_in(v, where, 0, limits[key])
        elif key == "tab":
            _short_str(v, where, 64)
        elif isinstance(v, str):
            _short_str(v, where)
        elif v is not None and not isinstance(v, bool) and not _is_number(v):
            raise _fail(where, f"must be a number, a boolean, a short string or null, got {type(v).__name__}")
        out[key] = v
    return out


def validate_lesson(raw: Any, *, max_model_bytes: int | None = DEFAULT_MAX_MODEL_BYTES) -> dict[str, Any]:
    """A checked, normalised copy of a lesson dict; :class:`LessonError` says what is wrong."""
    if not isinstance(raw, dict):
        raise _fail("file", f"must hold a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise _fail("format", f"must be {FORMAT!r}: this is not a gptviz lesson")
    version = raw.get("version")
    if version != FORMAT_VERSION or not _is_int(version):
        raise _fail("version", f"{version!r:.40} is not a version this gptviz reads (it reads version "
                               f"{FORMAT_VERSION}); a newer gptviz may read it")
    unknown = sorted(map(str, set(raw) - _TOP_KEYS))
    if unknown:
        raise _fail("", f"unknown key(s) {', '.join(unknown)[:200]}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise _fail("", f"missing key(s) {', '.join(missing)}")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r:.40}")
    model = _check_model(raw["model"], dtype, max_model_bytes)
    cfg = GPTConfig.from_dict(model["config"])
    vocab = cfg.vocab_size
    prompt_ids = _check_ids(raw["prompt_ids"], "prompt_ids", vocab, min_len=1, max_len=MAX_LESSON_TOKENS)
    generated = _check_ids(raw["generated_ids"], "generated_ids", vocab, min_len=0,
                           max_len=MAX_LESSON_TOKENS - len(prompt_ids))
    out: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "title": _short_str(raw.get("title", ""), "title"),
        "model": model,
        "dtype": dtype,
        "prompt_text": _short_str(raw.get("prompt_text", ""), "prompt_text", MAX_TEXT_CHARS),
        "prompt_ids": prompt_ids,
        "generated_ids": generated,
        "sampling": _check_sampling(raw["sampling"], vocab),
        "sampling_changes": _check_changes(raw.get("sampling_changes", []), vocab, len(generated)),
        "views": _check_views(raw.get("views", {}), cfg, len(generated)),
    }
    if "gptviz_version" in raw:
        out["gptviz_version"] = _short_str(raw["gptviz_version"], "gptviz_version", 40)
    return out


# --------------------------------------------------------------------------- files


def _no_constants(name: str) -> Any:
    raise LessonError(f"lesson file: {name} is not allowed in a lesson")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise LessonError(f"lesson file: key {k!r:.60} appears twice")
        out[k] = v
    return out


def _parse(text: str | bytes) -> Any:
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > MAX_LESSON_BYTES:
        raise _fail("file", f"is {size:,} bytes, at most {MAX_LESSON_BYTES:,} allowed")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise _fail("file", f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except LessonError:
        raise
    except RecursionError:
        raise _fail("file", "is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and huge integers (int max str digits)
        raise _fail("file", f"is not valid JSON ({str(e)[:120]})") from None


def load_lesson(source: Mapping[str, Any] | str | bytes | os.PathLike[str], *,
                max_model_bytes: int | None = DEFAULT_MAX_MODEL_BYTES) -> dict[str, Any]:
    """A validated lesson from a dict, JSON text (``str`` or ``bytes``) or a file (``os.PathLike``,
    e.g. ``Path(upload)``: a ``str`` is never taken as a path).

    Raises :class:`LessonError` (a ``ValueError``) for anything that is not a lesson this
    gptviz can read; ``max_model_bytes`` bounds the model a ``random`` lesson describes.
    """
    if isinstance(source, os.PathLike):
        path = Path(source)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_LESSON_BYTES + 1)
        except OSError as e:
            raise LessonError(f"lesson file cannot be read: {e.strerror or e}") from None
        raw = _parse(data)
    elif isinstance(source, (str, bytes, bytearray)):
        if isinstance(source, str) and not source.lstrip().startswith("{"):
            raise _fail("text", "is not a JSON object (to read a file, pass a pathlib.Path)")
        raw = _parse(bytes(source) if isinstance(source, bytearray) else source)
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raise LessonError(f"a lesson is a dict, JSON text or a file path, got {type(source).__name__}")
    return validate_lesson(raw, max_model_bytes=max_model_bytes)
