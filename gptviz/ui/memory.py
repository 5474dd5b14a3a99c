"""One memory budget for every visitor: what the app holds, counted, and room made before it holds more.

What :meth:`MemoryBudget.usage` counts:

* ``app``: the process itself (Python, torch, Gradio), its RSS when the context was made;
* ``models``: every live model, each once by its tensors' storage: the shared ones in the
  :class:`~gptviz.ui.serving.ModelStore`, their low-precision copies, visitors' uploads and
  trained models, and models the store dropped that a session still holds (:meth:`track`);
* ``sessions``: every visitor's generation session (KV cache, attention rows, records);
* ``trainings``: every visitor's training (:class:`~gptviz.ui.train.TrainingRun`): the weights,
  their gradients and AdamW's two moments, at least :data:`STATE_FACTOR` × the weights from
  before its first step (the moments are made then);
* ``making``: what is being built, loaded or copied right now (:meth:`room`'s reservations).

Before a build, load, upload, precision copy, training or lesson makes more, :meth:`room` checks
the sum plus what it needs against one limit, ``GPTVIZ_MAX_TOTAL_BYTES``. Over it, it frees, in
this order, until it fits:

1. the low-precision copies (a cache: made again when asked);
2. shared models no visitor holds (never the start-up model every visitor falls back on);
3. what the asking visitor is about to replace (its previous model, when it switches);
4. idle visitors' models, trained models and stopped trainings, the longest idle first: such a
   visitor is back on the start-up model and is told at its next action (:meth:`tell`);
5. idle visitors' generation sessions, the longest idle first (told at their next Step).

A visitor whose event is running (its lock held) or whose training is going is never released.
If it still does not fit, :meth:`room` refuses with :class:`MemoryFull`: how much is in use, of
what, and the limit.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import sys
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import gradio as gr
import psutil
import torch

__all__ = ["MemoryBudget", "MemoryFull", "STATE_FACTOR", "module_storages", "process_bytes", "training_bytes",
           "drop_own", "trim_heap"]

#: Training memory as a multiple of the float32 weights: the weights, their gradients and AdamW's
#: two moments (one batch's activations come on top while a step runs).
STATE_FACTOR = 4


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def trim_heap() -> None:
    """Hand freed heap memory back to the system: glibc keeps it for reuse, so without
    ``malloc_trim`` the process would stay at its peak size after sessions end."""
    if hasattr(_LIBC, "malloc_trim"):  # glibc only
        _LIBC.malloc_trim(0)


def process_bytes() -> int:
    """This process's resident memory now (RSS)."""
    return psutil.Process().memory_info().rss


def module_storages(module: torch.nn.Module) -> dict[int, int]:
    """``{storage address: bytes}`` of a module's parameters and buffers (a tied or joined
    weight's storage once)."""
    out: dict[int, int] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr():
            out[storage.data_ptr()] = storage.nbytes()
    return out


def training_bytes(trainer: Any) -> int:
    """What a training holds beside its data: its model's weights and buffers, their gradients and
    the optimizer's state; at least :data:`STATE_FACTOR` × the weights (AdamW's moments appear at
    its first step, so they are counted from the start)."""
    model = trainer.model
    storages = module_storages(model)
    weights = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())
    held = sum(storages.values())
    try:
        held += sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        held += sum(t.nbytes for state in list(trainer.optimizer.state.values()) for t in list(state.values())
                    if isinstance(t, torch.Tensor) and t.dim())
    except RuntimeError:  # its first step is filling the state right now: the floor below counts it
        pass
    return max(held, sum(storages.values()) - weights + STATE_FACTOR * weights)


def drop_own(v: Any) -> None:
    """Visitor ``v`` is switching model: its session and own model go now, unless it is busy (room for the new one)."""
    if v.lock.acquire(blocking=False):
        v.session = v.own = None
        v.lock.release()


class MemoryFull(gr.Error):
    """The budget cannot make room: said to the visitor, the app goes on as before."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_exception=False)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class MemoryBudget:
    """The sum of what the app holds (module docstring) against ``limit`` bytes.

    ``ctx`` is the app's :class:`~gptviz.ui.serving.AppContext`, read at each count (its
    ``models``, ``visitors`` and ``default_spec``); ``base`` the app's own bytes (None: its RSS now).
    """

    def __init__(self, ctx: Any, limit: int, base: int | None = None) -> None:
        self.ctx, self.limit = ctx, limit
        self.base = process_bytes() if base is None else base
        self._deciding = threading.Lock()  # one decision at a time: count, free, reserve
        self._lock = threading.Lock()  # the tracked models and the reservations
        self._models: weakref.WeakSet = weakref.WeakSet()
        self._making: dict[int, int] = {}  # reservation id -> bytes
        self._ids = itertools.count()
        self.released = 0  # visitors released to make room so far (tests, the load benchmark)

    # --------------------------------------------------------------- counting
    def track(self, model: Any) -> Any:
        """Count ``model`` for as long as it lives (whoever holds it); returns it."""
        with self._lock:
            self._models.add(model)
        return model

    def usage(self) -> dict[str, int]:
        """Bytes held now: ``app``, ``models``, ``sessions``, ``trainings``, ``making`` and ``total``."""
        visitors = self.ctx.visitors.snapshot()
        with self._lock:
            models = list(self._models)
            making = sum(self._making.values())
        models += self.ctx.models.held()
        for v in visitors:
            s = v.session
            models += [m for m in (v.own, s.model if s is not None else None) if m is not None]
        storages: dict[int, int] = {}
        for m in models:
            storages.update(module_storages(m))
        sessions = sum(s.retained_bytes for v in visitors if (s := v.session) is not None)
        trainings = sum(training_bytes(t.trainer) for v in visitors if (t := v.training) is not None)
        out = dict(app=self.base, models=sum(storages.values()), sessions=sessions, trainings=trainings, making=making)
        return out | dict(total=sum(out.values()))

    def in_use(self) -> int:
        return self.usage()["total"]

    # --------------------------------------------------------------- making room
    @contextmanager
    def room(self, need: int, what: str, asker: Any = None,
             replaced: Callable[[], None] | None = None) -> Iterator[None]:
        """Within it, ``need`` more bytes are reserved for making ``what`` (a model, a copy, a
        training); released at its end, when the thing made is counted instead. ``asker``: the
        visitor asking (never released for it); ``replaced()`` frees what the asker's new thing
        replaces, should room be short. Raises :class:`MemoryFull` if room cannot be made."""
        with self._deciding:
            usage = self._fit(need, asker, replaced)
            if usage["total"] + need > self.limit:
                raise MemoryFull(self.refusal(what, need, usage))
            with self._lock:
                key = next(self._ids)
                self._making[key] = need
        try:
            yield
        finally:
            with self._lock:
                del self._making[key]

    def refusal(self, what: str, need: int, usage: dict[str, int]) -> str:
        """Why ``what`` cannot be made: what is in use, of what, and the limit."""
        parts = (f"models {_gb(usage['models'])}, generation caches {_gb(usage['sessions'])}, trainings "
                 f"{_gb(usage['trainings'])}, being made now {_gb(usage['making'])}, the app itself {_gb(usage['app'])}")
        if usage["app"] + need > self.limit:
            why = "That is more than this server allows beside the app itself: choose a smaller model or bfloat16."
        else:
            why = ("The rest belongs to visitors who are active now, so nothing more could be released: try again in "
                   "a while, or choose a smaller model or bfloat16.")
        return (f"Not enough server memory for {what}: it needs {_gb(need)}, and {_gb(usage['total'])} of the "
                f"{_gb(self.limit)} this app may use for all its visitors (GPTVIZ_MAX_TOTAL_BYTES) are in use "
                f"({parts}). {why}")

    def _fit(self, need: int, asker: Any, replaced: Callable[[], None] | None) -> dict[str, int]:
        """Free (module docstring, steps 1-5) until ``need`` more fits; the usage then."""
        usage = self.usage()
        if usage["total"] + need <= self.limit:
            return usage
        idle = sorted((v for v in self.ctx.visitors.snapshot() if v is not asker), key=lambda v: v.last_used)
        steps = itertools.chain(
            [self.ctx.models.drop_copies, lambda: self._drop_unheld(asker, False)],
            [lambda: (replaced(), self._drop_unheld(asker, True))] if replaced is not None else [],
            (lambda v=v: self._release(v) and self._drop_unheld(asker, replaced is not None) for v in idle),
            (lambda v=v: self._release_session(v) for v in idle),
            [gc.collect])  # anything a reference cycle still held
        for step in steps:
            step()
            usage = self.usage()
            if usage["total"] + need <= self.limit:
                break
        trim_heap()  # what was freed goes back to the system now
        return usage

    def _drop_unheld(self, asker: Any, asker_leaves: bool) -> None:
        """Drop the shared models whose spec no visitor has (the asker's, if it is leaving it, excluded)."""
        held = {v.spec for v in self.ctx.visitors.snapshot() if not (asker_leaves and v is asker)}
        self.ctx.models.drop(keep=held | {self.ctx.default_spec})

    def _release(self, v: Any) -> bool:
        """An idle visitor's own memory (its model unless it is the start-up one, its stopped
        training): it goes back to the start-up model and is told at its next action (the message
        is kept in ``v.released_model``). False if it is busy or holds nothing of its own."""
        if not v.lock.acquire(blocking=False):
            return False
        try:
            what, then, run = [], [], v.training
            if v.spec != self.ctx.default_spec:  # (an upload or a trained model has a spec of its own)
                what.append(f"your model ({v.spec.label})")
                then.append(f"You are back on {self.ctx.default_spec.label}: load or build yours again on the Model tab")
                v.spec, v.session, v.own = self.ctx.default_spec, None, None
            if run is not None and not run.active:  # a training that is going is in use
                what.append(f"your {'finished' if run.trainer.done else 'stopped'} training ({run.what})")
                then.append("press Start on the Train tab to train again")
                run.trainer.stop()
                v.training = None
            if what:
                told = " and ".join(what)
                v.released_model = (f"{told[0].upper()}{told[1:]} {'were' if len(what) > 1 else 'was'} released while "
                                    f"you were idle: other visitors needed the server's memory. {'; '.join(then)}.")
                v.released = False  # this message says it all
        finally:
            v.lock.release()
        self.released += bool(what)
        return bool(what)

    @staticmethod
    def _release_session(v: Any) -> None:
        if v.session is not None and v.lock.acquire(blocking=False):
            v.session, v.released = None, True  # told at its next Step (the Generate view)
            v.lock.release()

    @staticmethod
    def tell(v: Any) -> None:
        """At a visitor's next action after its model or training was released: a warning, once."""
        message, v.released_model = v.released_model, None
        if message:
            gr.Warning(message)
