"""The app context: the shared models, the visitors, the turns they take on the model, the settings.

One :class:`AppContext` serves the whole page. The views hold it (never a module global), so a
test builds a context with its own :class:`~gptviz.settings.Settings` and calls the handlers
directly. Everything here is about serving many visitors from one process:

* :class:`ModelStore`: models shared read-only by every visitor, built once per
  :class:`ModelSpec`, least recently used dropped.
* :class:`Visitors`: one :class:`Visitor` per browser tab (Gradio's ``session_hash``), with
  its chosen model and :class:`~gptviz.generation.session.GenerationSession`; bounded in number and
  idle time, released the moment the tab closes (Gradio's ``unload`` event).
* :meth:`AppContext.turns`: model work takes turns on one lock, wrapped around each handler
  when its event is wired. On a CPU torch already uses every core for one step; two at once
  only slow each other down. A generator (Step ×N) takes a turn per item.

Drawing takes the turn too. A forward pass hands Python's GIL back and forth around each of
its ~1,000 torch calls; a thread busy in Python beside it (plotly building a figure) keeps the
GIL up to the 5 ms switch interval each time. Measured here: a batch of 8 Steps took 126 ms
alone and 1,135 ms beside one thread drawing figures. So a batch's leader draws every
visitor's view right after their step, in its turn (:class:`~gptviz.ui.turns.StepBatcher`),
and other model events build and serialise their figures inside their turn
(:func:`~gptviz.ui.components.rendered`).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import gradio as gr
import torch

from ..analysis.inside import low_precision_copy
from ..files.weights import WeightsError, estimated_bytes, hub_answers
from ..generation.session import GenerationSession
from ..kernels import set_cpu_kernel
from ..model import GPTModel
from ..settings import Settings
from .components import rendered
from .memory import MemoryBudget, drop_own, trim_heap
from .models import OWN, TRAINED, UPLOAD, ModelSpec, build_model, start_model
from .turns import ReadAhead, StepBatcher, Turns

__all__ = ["UPLOAD", "TRAINED", "OWN", "ModelSpec", "start_model", "ModelStore", "Visitor", "Visitors", "Turns", "StepBatcher", "AppContext", "build_model", "error"]


def error(message: str) -> gr.Error:
    """A message for the visitor (no traceback in the server log: it is their input, not a bug)."""
    return gr.Error(message, print_exception=False)


# --------------------------------------------------------------------------- shared models


class ModelStore:
    """Models shared read-only by every visitor, least recently used dropped beyond ``capacity``.

    A model is built once: concurrent requests for the same spec wait for the first build.
    Sessions hold a reference to their model, so dropping it here never breaks a visitor.
    The precision view's low-precision copies are kept here too (:meth:`low_precision`), at
    most one per dtype and model, dropped with their model. A dropped model that a session still
    holds is handed out again, not built twice. ``room()``, given to :meth:`get` and
    :meth:`low_precision`, is entered around a build or copy (the memory budget's reservation).
    """

    def __init__(self, build: Callable[[ModelSpec], GPTModel], capacity: int = 3,
                 track: Callable[[GPTModel], GPTModel] = lambda m: m) -> None:
        self.build, self.capacity, self.track = build, capacity, track
        self._lock = threading.Lock()
        self._models: OrderedDict[ModelSpec, Future] = OrderedDict()
        self._low: dict[tuple[ModelSpec, torch.dtype], Future] = {}
        self._gone: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # dropped, still held somewhere

    def _once(self, table: dict, key: Any, make: Callable[[], GPTModel]) -> GPTModel:
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

    def _build(self, spec: ModelSpec, room: Callable[[], ContextManager]) -> GPTModel:
        alive = self._gone.get(spec)
        if alive is not None:
            return alive
        with room():
            return self.track(self.build(spec))

    def get(self, spec: ModelSpec, room: Callable[[], ContextManager] = nullcontext) -> GPTModel:
        model = self._once(self._models, spec, lambda: self._build(spec, room))
        with self._lock:
            if spec in self._models:
                self._models.move_to_end(spec)
            while len(self._models) > self.capacity:
                self._drop(next(iter(self._models)))
        return model

    def _drop(self, spec: ModelSpec) -> None:
        """Forget ``spec``'s model and its copies (with ``_lock`` held)."""
        future = self._models.pop(spec)
        if future.done() and future.exception() is None:
            self._gone[spec] = future.result()
        for key in [k for k in self._low if k[0] == spec]:
            del self._low[key]

    def drop(self, keep: set[ModelSpec]) -> None:
        """Forget every built model whose spec is not in ``keep`` (the memory budget's room)."""
        with self._lock:
            for spec in [s for s, f in self._models.items() if s not in keep and f.done()]:
                self._drop(spec)

    def drop_copies(self) -> None:
        with self._lock:
            for key in [k for k, f in self._low.items() if f.done()]:
                del self._low[key]

    def built(self) -> dict[Any, GPTModel]:
        """The models (by spec) and copies (by spec and dtype) built and kept here now."""
        with self._lock:
            futures = {**self._models, **self._low}
        return {k: f.result() for k, f in futures.items() if f.done() and f.exception() is None}

    def low_precision(self, spec: ModelSpec, dtype: torch.dtype,
                      room: Callable[[], ContextManager] = nullcontext) -> GPTModel:
        """A ``dtype`` copy of the shared model of ``spec``, made once and dropped with the model."""
        model = self.get(spec)

        def copy() -> GPTModel:
            with room():
                return self.track(low_precision_copy(model, dtype))

        low = self._once(self._low, (spec, dtype), copy)
        with self._lock:
            if spec not in self._models:  # the model was dropped meanwhile: so is its copy
                self._low.pop((spec, dtype), None)
        return low

    def __contains__(self, spec: ModelSpec) -> bool:
        with self._lock:
            future = self._models.get(spec)
        return future is not None and future.done() and future.exception() is None


# --------------------------------------------------------------------------- visitors


@dataclass(eq=False)
class Visitor:
    """One browser tab: its chosen model and its generation session (no model copy)."""

    spec: ModelSpec
    session: GenerationSession | None = None  # holds a reference to the shared model, never a copy
    own: GPTModel | None = None  # the visitor's uploaded or trained model (spec.source in OWN), theirs alone
    training: Any = None  # its training on the Train view (gptviz.ui.train.TrainingRun), if any
    value_weighted: bool = False  # its heatmaps show attention × value norm
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one event at a time
    last_used: float = field(default_factory=time.monotonic)  # of its last event
    released: bool = False  # its session was dropped to make room for others (said at its next Step)
    released_model: str | None = None  # what of its own the memory budget released (said at its next action)


class Visitors:
    """The visitors by Gradio session (one per browser tab or ``gradio_client.Client``).

    Bounded three ways: at most ``max_sessions`` visitors (least recently used forgotten), an
    idle visitor is forgotten after ``ttl_s``, and at most ``max_live`` keep a generation
    session (KV cache and history) at once — beyond that the longest idle one that is not busy
    drops its session and is told so at its next Step.
    """

    def __init__(self, default_spec: ModelSpec, max_sessions: int, max_live: int, ttl_s: float) -> None:
        self.default_spec = default_spec
        self.max_sessions, self.max_live, self.ttl_s = max_sessions, max_live, ttl_s
        self._lock = threading.Lock()
        self._by_id: OrderedDict[str, Visitor] = OrderedDict()

    def get(self, session_id: str) -> Visitor:
        """The visitor of a session, made on its first event."""
        now = time.monotonic()
        with self._lock:
            v = self._by_id.get(session_id)
            if v is None:
                v = self._by_id[session_id] = Visitor(self.default_spec)
            self._by_id.move_to_end(session_id)
            v.last_used = now
            stale = [k for k, u in self._by_id.items() if now - u.last_used > self.ttl_s]
            stale += list(self._by_id)[: max(0, len(self._by_id) - len(stale) - self.max_sessions)]
            dropped = [self._by_id.pop(k) for k in dict.fromkeys(stale) if k != session_id]
        for u in dropped:
            self._free(u)
        if dropped:
            trim_heap()
        return v

    def release(self, session_id: str) -> None:
        """A tab closed: forget its visitor and free its generation session now."""
        with self._lock:
            v = self._by_id.pop(session_id, None)
        if v is not None:
            self._free(v)
        trim_heap()

    @staticmethod
    def _free(v: Visitor) -> None:
        if v.training is not None:  # a closed or forgotten tab stops its training after the step in progress
            v.training.trainer.stop()
            v.training = None
        if v.lock.acquire(blocking=False):  # a busy one is freed when its running event ends
            v.session = v.own = None
            v.lock.release()

    def admit(self, v: Visitor) -> None:
        """``v`` has a new generation session: beyond ``max_live``, the least recently used others
        that are not busy drop theirs (their KV cache and history: the memory)."""
        with self._lock:
            others = sorted((u for u in self._by_id.values() if u is not v and u.session is not None),
                            key=lambda u: u.last_used)
        excess = len(others) + 1 - self.max_live
        for u in others:
            if excess <= 0:
                break
            if u.lock.acquire(blocking=False):
                u.session, u.released = None, True
                u.lock.release()
                excess -= 1

    def admit_upload(self, v: Visitor, max_uploads: int) -> None:
        """``v`` now holds its own uploaded model: beyond ``max_uploads``, the least recently used
        others that are not busy release theirs (told at their next action)."""
        with self._lock:
            others = sorted((u for u in self._by_id.values() if u is not v and u.own is not None),
                            key=lambda u: u.last_used)
        excess = len(others) + 1 - max_uploads
        for u in others:
            if excess <= 0:
                break
            if u.lock.acquire(blocking=False):
                u.own = u.session = None
                u.lock.release()
                excess -= 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def snapshot(self) -> list[Visitor]:
        with self._lock:
            return list(self._by_id.values())

    def live_sessions(self) -> int:
        with self._lock:
            return sum(v.session is not None for v in self._by_id.values())


# --------------------------------------------------------------------------- the context


class AppContext:
    """Everything the views share: settings, models, visitors and the model's turns."""

    def __init__(self, settings: Settings | None = None, default_spec: ModelSpec | None = None,
                 hub: Callable[[], tuple[bool, str]] = hub_answers) -> None:
        self.settings = settings or Settings.from_env()
        self.device = self.settings.torch_device
        # the start-up model, and why (the Model view says it); hub() is asked only for gpt2-or-shipped
        self.default_spec, self.default_note = (default_spec, "") if default_spec else start_model(self.settings, hub)
        s = self.settings
        self.memory = MemoryBudget(self, s.max_total_bytes)  # one budget for all (gptviz.ui.memory)
        self.models = ModelStore(lambda spec: build_model(spec, self.device), s.model_store_capacity,
                                 track=self.memory.track)
        set_cpu_kernel(s.cpu_kernel)  # NEW (speed): float32 products' kernel, per process (gptviz.kernels.linear)
        self.visitors = Visitors(self.default_spec, s.max_sessions, s.max_live_sessions, s.session_ttl_s)
        self.turn = Turns()  # one unit of model work at a time, steps first
        self.steps = StepBatcher(self.turn)  # visitors' concurrent Steps in one forward
        # next steps read while the model is idle, unless a class is stepping together
        self.ahead = ReadAhead(self.turn, enabled=s.read_ahead, crowded=self.steps.crowded)

    # --- visitors and their models
    def visitor(self, request: Any) -> Visitor:
        """The visitor of a Gradio request (``request.session_hash``; a test passes any object with one)."""
        session_id = getattr(request, "session_hash", None) or "anonymous"
        v = self.visitors.get(session_id)
        if v.released_model:
            self.memory.tell(v)
        return v

    def model(self, v: Visitor, asker: Visitor | None = None, replace: bool = True) -> GPTModel:
        """The visitor's model: its upload, or the shared model of its spec (built or loaded on first
        use, within the memory budget); a message if it cannot be had. ``asker``: the visitor who
        switches to ``v.spec`` (``v`` a stand-in), whose current model may make room if ``replace``."""
        if v.spec.source in OWN:
            if v.own is None:
                again = "upload it again on the Model tab" if v.spec.source == UPLOAD else "train it again"
                raise error(f"Your {'uploaded' if v.spec.source == UPLOAD else 'trained'} model was released (the "
                            f"tab was idle too long, or others' models needed the room): {again}.")
            return v.own
        asker = asker or v
        replaced = functools.partial(drop_own, asker) if asker is not v and replace else None
        try:
            return self.models.get(v.spec, lambda: self.memory.room(v.spec.peak_bytes(), v.spec.label, asker, replaced))
        except WeightsError as e:
            raise error(f"Could not load {v.spec.label}: {e}") from None

    def low_precision(self, v: Visitor, dtype: torch.dtype) -> GPTModel:
        """A ``dtype`` copy of the visitor's model, within the memory budget: of a shared model made
        once (:meth:`ModelStore.low_precision`), of the visitor's own for this use."""
        model = self.model(v)
        room = functools.partial(self.memory.room, estimated_bytes(model.cfg, dtype),
                                 f"a {str(dtype).removeprefix('torch.')} copy of {v.spec.label}", v)
        if v.spec.source in OWN:
            with room():
                return self.memory.track(low_precision_copy(model, dtype))
        return self.models.low_precision(v.spec, dtype, room)

    def preload(self) -> threading.Thread:
        """Build the start-up model in the background so the first Step does not wait for it."""
        def run() -> None:
            try:
                self.models.get(self.default_spec)
            except Exception as e:  # reported to the visitor on first use; the app keeps serving
                print(f"gptviz: could not preload {self.default_spec.label}: {e}")

        thread = threading.Thread(target=run, name="gptviz-preload", daemon=True)
        thread.start()
        return thread

    # --- turns on the model
    @property
    def model_event(self) -> dict[str, Any]:
        """Event arguments of model work: admitted ``model_concurrency`` at once (they then take
        turns through :meth:`turns`), without Gradio's progress overlay."""
        return dict(concurrency_id="model", concurrency_limit=self.settings.model_concurrency,
                    show_progress="hidden")

    def turns(self, fn: Callable, priority: int = Turns.STEP) -> Callable:
        """``fn`` run in a turn on the model, its figures serialised in the same turn; for a
        generator, each item in a turn of its own (free in between, so a Step ×N or a sliced
        analysis lets other visitors' Steps run between its items). Analyses pass
        ``priority=Turns.ANALYSIS``: waiting Steps go first."""
        turns = self.turn
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                items = fn(*args, **kwargs)
                try:
                    while True:
                        with turns.turn(priority):
                            item = rendered(next(items, StopIteration))
                        if item is StopIteration:
                            return
                        yield item
                finally:
                    items.close()  # a visitor who left mid-analysis: its slices stop here
            return stream

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            with turns.turn(priority):
                return rendered(fn(*args, **kwargs))
        return call
