"""One memory budget for every visitor: what the app holds, counted, and room made before it holds more.

What :meth:`MemoryBudget.usage` counts:

* ``app``: the process itself (Python, torch, Gradio, requests, the allocator's slack): its RSS
  beyond everything below, and at least its RSS when the context was made, so the total is never
  below the process's RSS;
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
4. idle visitors' models, uploads, trained models and stopped trainings, the longest idle first
   (a shared model goes when every visitor on it is idle, all of them released together): such
   a visitor is back on the start-up model and is told at its next action (:meth:`tell`);
5. idle visitors' generation sessions, the longest idle first (told at their next Step).

Idle: no event for :data:`IDLE_S` seconds. A visitor whose event is running (its lock held) or
whose training is going is never released, and nobody is released unless the plan frees enough
(:meth:`MemoryBudget._plan`). If it still does not fit, :meth:`room` refuses with
:class:`MemoryFull`: how much is in use, of what, and the limit.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import sys
import threading
import time
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
#: A visitor without an event for this long is idle: its memory may make room for others. (Sooner,
#: a class building models at once would release each other's in turn and rebuild without end.)
IDLE_S = 60.0


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


def _nbytes(model: torch.nn.Module) -> int:
    return sum(module_storages(model).values())


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class MemoryBudget:
    """The sum of what the app holds (module docstring) against ``limit`` bytes.

    ``ctx`` is the app's :class:`~gptviz.ui.serving.AppContext`, read at each count (its
    ``models``, ``visitors`` and ``default_spec``); ``base`` the app's own bytes (None: measured,
    the process's RSS beyond what is counted, at least its RSS now; a test passes a number).
    """

    def __init__(self, ctx: Any, limit: int, base: int | None = None) -> None:
        self.ctx, self.limit, self.base = ctx, limit, base
        self._floor = process_bytes()  # the app before any model
        self._deciding = threading.Lock()  # one decision at a time: count, free, reserve
        self._lock = threading.Lock()  # the tracked models and the reservations
        self._models: weakref.WeakSet = weakref.WeakSet()
        self._making: dict[int, int] = {}  # reservation id -> bytes
        self._ids = itertools.count()
        self.idle_s = IDLE_S
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
        models += self.ctx.models.built().values()
        for v in visitors:
            s = v.session
            models += [m for m in (v.own, s.model if s is not None else None) if m is not None]
        storages: dict[int, int] = {}
        for m in models:
            storages.update(module_storages(m))
        sessions = sum(s.retained_bytes for v in visitors if (s := v.session) is not None)
        trainings = sum(training_bytes(t.trainer) for v in visitors if (t := v.training) is not None)
        out = dict(models=sum(storages.values()), sessions=sessions, trainings=trainings, making=making)
        app = self.base if self.base is not None else max(self._floor, process_bytes() - sum(out.values()))
        return dict(app=app, **out, total=app + sum(out.values()))

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
        """Free (module docstring, steps 1-5) until ``need`` more fits; the usage then. Visitors
        are released only when the plan (:meth:`_plan`) frees enough: never for a refusal."""
        usage = self.usage()
        if usage["total"] + need <= self.limit:
            return usage
        self.ctx.models.drop_copies()  # nobody loses anything by these two
        self._drop_unheld(asker, False)
        usage = self.usage()
        plan = self._plan(usage["total"] + need - self.limit, asker, replaced) if usage["total"] + need > self.limit else []
        for act in itertools.chain(plan or [], [gc.collect] if plan else []):  # gc: what a reference cycle held
            act()
            usage = self.usage()
            if usage["total"] + need <= self.limit:
                break
        trim_heap()  # what was freed goes back to the system now
        return usage

    def _plan(self, short: int, asker: Any, replaced: Callable[[], None] | None) -> list[Callable[[], Any]] | None:
        """What to release to free ``short`` bytes, in order (steps 3-5), or None if all of it would
        not be enough. A shared model is freed when every visitor on it is released: it is idle
        when they all are, as idle as the latest of them."""
        visitors, default, now = self.ctx.visitors.snapshot(), self.ctx.default_spec, time.monotonic()
        leaving = replaced is not None
        sizes = {k: _nbytes(m) for k, m in self.ctx.models.built().items()}
        for v in visitors:  # a model the store dropped that sessions still hold
            if v.own is None and v.session is not None and v.spec not in sizes:
                sizes[v.spec] = _nbytes(v.session.model)

        def idle(v: Any) -> bool:
            return v is not asker and not v.lock.locked() and now - v.last_used >= self.idle_s

        def stopped(v: Any) -> int:  # its training, if it is not going
            return training_bytes(v.training.trainer) if v.training is not None and not v.training.active else 0

        def own(v: Any) -> int:  # its session and its own model
            return (v.session.retained_bytes if v.session is not None else 0) + (_nbytes(v.own) if v.own is not None else 0)

        groups: dict[Any, list[Any]] = {}  # the visitors on each shared model; each visitor on its own or the start-up one
        for v in visitors:
            if not (leaving and v is asker):
                groups.setdefault(v.spec if v.own is None and v.spec != default else id(v), []).append(v)
        moves = []  # (as idle as, bytes it frees, what it does)
        for key, members in groups.items():
            if members[0].spec != default and all(map(idle, members)):  # the model and all its visitors hold
                moves.append((max(v.last_used for v in members), sizes.get(key, 0) + sum(own(v) + stopped(v) for v in members),
                              lambda members=members: [self._release(v) for v in members]))
            else:  # on the start-up model, or someone on it is busy: only stopped trainings
                moves += [(v.last_used, stopped(v), lambda v=v: self._release(v, spec_too=False))
                          for v in members if idle(v) and stopped(v)]
        moves.sort(key=lambda m: m[0])
        gone = {id(v) for key, members in groups.items() if members[0].spec != default and all(map(idle, members))
                for v in members}
        moves += [(v.last_used, v.session.retained_bytes, lambda v=v: self._release_session(v))
                  for v in sorted(visitors, key=lambda v: v.last_used)
                  if idle(v) and v.session is not None and id(v) not in gone]
        if leaving:  # first what the asker's new model replaces
            alone = asker.own is None and asker.spec != default and asker.spec not in groups
            moves.insert(0, (0, own(asker) + (sizes.get(asker.spec, 0) if alone else 0), replaced))
        total, plan = 0, []
        for _, freed, act in moves:
            total += freed
            plan.append(lambda act=act: (act(), self._drop_unheld(asker, leaving)))
            if total >= short:
                return plan
        return None

    def _drop_unheld(self, asker: Any, asker_leaves: bool) -> None:
        """Drop the shared models whose spec no visitor has (the asker's, if it is leaving it, excluded)."""
        held = {v.spec for v in self.ctx.visitors.snapshot() if not (asker_leaves and v is asker)}
        self.ctx.models.drop(keep=held | {self.ctx.default_spec})

    def _release(self, v: Any, spec_too: bool = True) -> bool:
        """An idle visitor's own memory (its model unless it is the start-up one, its stopped
        training; only the training if not ``spec_too``): it goes back to the start-up model and is
        told at its next action (the message is kept in ``v.released_model``). False if it is busy
        or holds nothing of its own."""
        if not v.lock.acquire(blocking=False):
            return False
        try:
            what, then, run = [], [], v.training
            if spec_too and v.spec != self.ctx.default_spec:  # (an upload or a trained model has a spec of its own)
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
