"""Lesson files: a small JSON that replays a generation walk-through.

A teacher steps through generation, exports a lesson, and a learner (or the teacher, next
term) loads it to get the same session back: the same prompt, the same generated ids, the
same sampling settings and the view that was selected.

    lesson = lesson_from_session(session, model_source=random_source(cfg), dtype="float32",
                                 views={"tab": "generate", "layer": 1, "head": 0, "step": 6})
    save_lesson(lesson, Path("lesson.json"))
    lesson = load_lesson(Path("lesson.json"))          # validated; a lesson is untrusted input
    result = replay(lesson, model_for_lesson(lesson))  # steps one at a time, comparing ids
    result.ok, result.matched_steps, result.diverged_at, result.expected, result.got

The format and the checks of untrusted lesson files (:func:`load_lesson`,
:func:`validate_lesson`) are in :mod:`gptviz.files.lesson_format`; this module re-exports them.

Sampling settings: ``sampling`` holds the settings the first step used — ``temperature``,
``sample_top_k``, ``seed``, ``stop_at_eos`` and ``top_p`` (when the session has it), plus any
other plain setting of :class:`GenerationSession`'s signature that is not a display or memory
option (:data:`SESSION_OPTIONS`). When the settings changed between steps
(``GenerationSession.set_sampling``; each ``StepRecord`` carries the settings it used),
``sampling_changes`` lists them: ``{"step": k, ...changed settings...}`` applies before
generated token ``k`` (``k`` = the number of generated ids: the settings the session was
left with). :func:`replay` passes each stored setting that the installed session accepts
(constructor, then ``set_sampling`` before the step); one it does not accept is refused
unless it is null (the neutral default).
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tiktoken
import torch

from ..config import GPTConfig
from ..generation.session import GenerationSession, StepRecord
from ..model import GPTModel
from ..settings import DTYPES
from ..tokenizer import get_encoding, token_piece
from . import lesson_format
from .lesson_format import DEFAULT_MAX_MODEL_BYTES, FORMAT, FORMAT_VERSION, KNOWN_SAMPLING, MAX_ENTRIES, MAX_LESSON_BYTES, MAX_LESSON_TOKENS, MAX_SHORT_CHARS, MAX_TEXT_CHARS, MODEL_KINDS, SESSION_OPTIONS, LessonError, _is_number, load_lesson, validate_lesson

__all__ = [
    *lesson_format.__all__,  # the format, LessonError, load_lesson, validate_lesson
    "TokenRef",
    "ReplayResult",
    "random_source",
    "hub_source",
    "custom_source",
    "lesson_from_session",
    "save_lesson",
    "lesson_to_json",
    "model_for_lesson",
    "replay",
]


# --------------------------------------------------------------------------- model sources


def random_source(cfg: GPTConfig | Mapping[str, Any], seed: int = 123) -> dict[str, Any]:
    """Model source of random weights: ``torch.manual_seed(seed)`` before ``GPTModel(cfg)``."""
    return {"kind": "random", "seed": seed, "config": GPTConfig.coerce(cfg).to_dict()}


def hub_source(name: str, cfg: GPTConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Model source of a released GPT-2 (``gpt2`` … ``gpt2-xl``)."""
    source: dict[str, Any] = {"kind": "hub", "name": name}
    if cfg is not None:
        source["config"] = GPTConfig.coerce(cfg).to_dict()
    return source


def custom_source(label: str, cfg: GPTConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Model source of weights a lesson cannot locate (an operator's checkpoint): ``label``
    is text for people only, never a path."""
    source: dict[str, Any] = {"kind": "custom", "label": label}
    if cfg is not None:
        source["config"] = GPTConfig.coerce(cfg).to_dict()
    return source


# --------------------------------------------------------------------------- export, files


def _session_parameters() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(GenerationSession.__init__).parameters)


def _is_option(name: str) -> bool:
    return name in SESSION_OPTIONS or name.startswith("max_") or name.startswith("_")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(name: str, v: Any) -> Any:
    return float(v) if name in ("temperature", "top_p") and v is not None else v


def _sampling_of(session: GenerationSession) -> dict[str, Any]:
    """Every sampling setting the session has now (the known ones, ``session.sampling`` if it
    has that, and any other plain setting of the constructor that is not a display or memory
    option)."""
    out: dict[str, Any] = {}
    current = getattr(session, "sampling", None)
    extra = list(current) if isinstance(current, Mapping) else []
    names = list(dict.fromkeys([*KNOWN_SAMPLING, *extra, *_session_parameters()]))
    for name in names:
        if _is_option(name) or not hasattr(session, name):
            continue
        v = getattr(session, name)
        if v is None or isinstance(v, (bool, str)) or _is_number(v):
            out[name] = _plain(name, v)
    return out


def _step_setting_names(session: GenerationSession) -> list[str]:
    """The settings ``set_sampling`` takes (none if the session cannot change them)."""
    setter = getattr(session, "set_sampling", None)
    if setter is None:
        return []
    return [n for n, p in inspect.signature(setter).parameters.items() if p.kind is p.KEYWORD_ONLY]


def _sampling_history(session: GenerationSession) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(settings of the first step, changes before later steps and after the last one), from the
    settings each StepRecord carries."""
    now = _sampling_of(session)
    names = [n for n in _step_setting_names(session) if n in now]
    per_step = [{n: _plain(n, getattr(r, n)) for n in names if hasattr(r, n)} for r in session.steps]
    states = per_step + [{n: now[n] for n in names}]
    first = {**now, **states[0]}
    changes, prev = [], states[0]
    for k, state in enumerate(states[1:], 1):
        diff = {n: v for n, v in state.items() if n not in prev or prev[n] != v}
        if diff:
            changes.append({"step": k, **diff})
        prev = {**prev, **state}
    return first, changes


def lesson_from_session(session: GenerationSession, *, model_source: Mapping[str, Any], dtype: str,
                        views: Mapping[str, Any] | None = None, title: str = "",
                        max_model_bytes: int | None = None) -> dict[str, Any]:
    """The lesson of a session: its prompt, generated ids and sampling settings.

    ``model_source``: :func:`random_source`, :func:`hub_source` or :func:`custom_source`
    (the session's configuration is filled in when the source has none, and must match it
    when it has). ``dtype``: the model's dtype name (``"float32"`` …). ``views``: what is
    selected, e.g. ``{"tab": "generate", "layer": 5, "head": 1, "step": 6}``. The result is
    validated like an upload (:class:`LessonError` if the session does not fit a lesson,
    e.g. more than :data:`MAX_LESSON_TOKENS` tokens).
    """
    source = dict(model_source)
    cfg = session.model.cfg.to_dict()
    if "config" not in source:
        source["config"] = cfg
    elif GPTConfig.coerce(source["config"]).to_dict() != cfg:
        raise LessonError("model_source's config is not the configuration of the session's model")
    else:
        source["config"] = GPTConfig.coerce(source["config"]).to_dict()
    from .. import __version__

    sampling, changes = _sampling_history(session)
    lesson = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "title": title,
        "model": source,
        "dtype": dtype,
        "prompt_text": _short(session.prompt_text, MAX_TEXT_CHARS),  # for people: replay reads the ids
        "prompt_ids": list(session.prompt_ids),
        "generated_ids": list(session.generated_ids),
        "sampling": sampling,
        "sampling_changes": changes,
        "views": dict(views or {}),
        "gptviz_version": __version__,
    }
    return validate_lesson(lesson, max_model_bytes=max_model_bytes)


def lesson_to_json(lesson: Mapping[str, Any]) -> str:
    """The lesson as JSON text (validated first; one line per field, UTF-8, no NaN)."""
    checked = validate_lesson(dict(lesson), max_model_bytes=None)
    lines = [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False, allow_nan=False)}" for k, v in checked.items()]
    text = "{\n " + ",\n ".join(lines) + "\n}"  # one line per field
    if len(text.encode("utf-8")) > MAX_LESSON_BYTES:
        raise LessonError(f"lesson is over {MAX_LESSON_BYTES} bytes as JSON")
    return text + "\n"


def save_lesson(lesson: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the lesson as UTF-8 JSON to ``path`` (a path the caller chose); returns it."""
    path = Path(path)
    path.write_text(lesson_to_json(lesson), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- models and replay

_SEED_LOCK = threading.Lock()


def model_for_lesson(lesson: Mapping[str, Any], *, device: torch.device | str | None = None,
                     max_model_bytes: int | None = DEFAULT_MAX_MODEL_BYTES) -> GPTModel:
    """The model of a ``random`` lesson: ``torch.manual_seed(seed)`` then ``GPTModel(config)``
    on the CPU (inside ``torch.random.fork_rng``, so no one's random state changes), moved to
    ``device`` (default CPU) and the lesson's dtype, in eval mode — the weights the app builds
    for random weights with that seed.

    Other kinds raise :class:`LessonError`: for ``hub`` names the app decides (its allow-list
    and its shared models), and ``custom`` weights are never located from a lesson.
    """
    lesson = load_lesson(lesson, max_model_bytes=max_model_bytes)
    source = lesson["model"]
    if source["kind"] != "random":
        raise LessonError(f"lesson model kind {source['kind']!r}: model_for_lesson builds random weights only; "
                          "the app chooses the model for named weights and passes it to replay()")
    cfg = GPTConfig.from_dict(source["config"])
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(source["seed"])
        model = GPTModel(cfg)
    return model.to(device=torch.device(device or "cpu"), dtype=DTYPES[lesson["dtype"]]).eval()


@dataclass(frozen=True)
class TokenRef:
    """One token of a replay report."""

    id: int
    piece: str  # display text (gptviz.tokenizer.token_piece(...).text; "<id>" outside the tokenizer)


@dataclass
class ReplayResult:
    """What :func:`replay` found.

    ``session``: the replayed session (the lesson's ids when ``ok``; on a divergence it holds
    the matched steps plus the step that differed, so its candidates show what the model
    preferred). ``matched_steps``: generated tokens that matched. ``diverged_at``: index
    (0-based) into the lesson's generated ids of the first step that differed, else None.
    ``expected`` / ``got``: the lesson's token and the model's token at that step (``got`` is
    None when the session stopped early, at ``<|endoftext|>`` with stop_at_eos).
    ``expected_rank``: the lesson's token's rank among that step's top candidates (0 = top),
    None if it is not among them. ``notes``: differences that may explain a divergence
    (another dtype or configuration than the lesson's).
    """

    session: GenerationSession
    matched_steps: int
    diverged_at: int | None = None
    expected: TokenRef | None = None
    got: TokenRef | None = None
    expected_rank: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.diverged_at is None

    @property
    def message(self) -> str:
        """One sentence for people."""
        n = len(self.session.generated_ids) if self.ok else self.matched_steps
        if self.ok:
            return f"replayed all {n} generated tokens: identical ids"
        exp = f"{self.expected.piece!r} ({self.expected.id})" if self.expected else "?"
        got = f"{self.got.piece!r} ({self.got.id})" if self.got else "nothing (the session stopped)"
        return (f"this model diverges at step {self.diverged_at + 1}: the lesson has {exp}, the model chose {got}; "
                f"{self.matched_steps} step(s) matched" + (f" ({'; '.join(self.notes)})" if self.notes else ""))


def _piece(token_id: int, enc: tiktoken.Encoding) -> str:
    return token_piece(token_id, enc).text if 0 <= token_id < enc.n_vocab else f"<{token_id}>"


def _session_kwargs(lesson: Mapping[str, Any]) -> dict[str, Any]:
    params = _session_parameters()
    kwargs: dict[str, Any] = {}
    for key, v in lesson["sampling"].items():
        if key in params and not _is_option(key):
            kwargs[key] = v
        elif v is not None:
            raise LessonError(f"lesson sampling.{key} = {v!r:.40}: this gptviz's GenerationSession has no such "
                              "setting, so it cannot replay the lesson")
    return kwargs


def replay(lesson: Mapping[str, Any] | str | bytes | os.PathLike[str], model: GPTModel | None = None, *,
           enc: tiktoken.Encoding | None = None, max_model_bytes: int | None = DEFAULT_MAX_MODEL_BYTES,
           **session_options: Any) -> ReplayResult:
    """Replay a lesson on ``model`` (default: :func:`model_for_lesson`, random lessons only).

    Builds a :class:`GenerationSession` from the lesson's prompt ids and sampling settings and
    runs its steps one at a time, comparing each token with the lesson's; stops at the first
    difference. ``session_options`` are the app's display and memory options for the session
    (``top_k``, ``attn_window``, ``logit_lens``, ``max_retained_bytes``). Raises
    :class:`LessonError` for a bad lesson or one whose settings this session cannot take.
    """
    lesson = load_lesson(lesson, max_model_bytes=max_model_bytes)
    bad = sorted(k for k in session_options if not _is_option(k) or k in ("self", "model", "enc", "prompt"))
    if bad:
        raise TypeError(f"replay() takes display and memory options only, not {', '.join(bad)}")
    if model is None:
        model = model_for_lesson(lesson, max_model_bytes=max_model_bytes)
    enc = enc or get_encoding()
    notes = []
    if str(model.dtype).removeprefix("torch.") != lesson["dtype"]:
        notes.append(f"the lesson was made in {lesson['dtype']}, this model runs in {str(model.dtype)[6:]}")
    if model.cfg.to_dict() != lesson["model"]["config"]:
        notes.append("this model's configuration differs from the lesson's")
    try:
        session = GenerationSession(model, enc, lesson["prompt_ids"], **_session_kwargs(lesson), **session_options)
    except LessonError:
        raise
    except ValueError as e:  # e.g. ids outside this model's vocabulary
        raise LessonError(f"lesson cannot be replayed on this model: {e}") from None
    changes = {c["step"]: {k: v for k, v in c.items() if k != "step"} for c in lesson["sampling_changes"]}
    setter = _setter(session, changes)
    result = ReplayResult(session, 0, notes=notes)
    for k, expected in enumerate(lesson["generated_ids"]):
        if k in changes:
            setter(changes[k])
        records: list[StepRecord] = session.step(1)
        if not records or records[0].token_id != expected:
            result.diverged_at = k
            result.expected = TokenRef(expected, _piece(expected, enc))
            if records:
                r = records[0]
                result.got = TokenRef(r.token_id, r.piece)
                result.expected_rank = next(
                    (rank for rank, c in enumerate(r.candidates) if c.token_id == expected), None)
            return result
        result.matched_steps = k + 1
    if len(lesson["generated_ids"]) in changes:  # the settings the lesson's session was left with
        setter(changes[len(lesson["generated_ids"])])
    return result


def _setter(session: GenerationSession, changes: Mapping[int, Mapping[str, Any]]) -> Any:
    """A function applying one ``sampling_changes`` entry to the session (checked up front:
    LessonError if the session cannot take a non-null setting of any entry)."""
    names = set(_step_setting_names(session))
    for step, change in changes.items():
        bad = sorted(k for k, v in change.items() if k not in names and v is not None)
        if bad:
            raise LessonError(f"lesson sampling_changes at step {step} sets {', '.join(bad)}: this gptviz's "
                              "GenerationSession cannot change that between steps, so it cannot replay the lesson")

    def apply(change: Mapping[str, Any]) -> None:
        try:
            session.set_sampling(**{k: v for k, v in change.items() if k in names})
        except ValueError as e:
            raise LessonError(f"lesson sampling_changes: {e}") from None

    return apply
