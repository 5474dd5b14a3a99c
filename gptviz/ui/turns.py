"""Turns on the shared model: one unit of model work at a time, Steps first, and visitors' Steps
(and fresh prompts' reads) that arrive together batched into one forward; the next step's read
made ahead while the model has nothing else to do."""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..generation.batching import next_reads_together, read_together, step_together
from ..generation.session import GenerationSession

__all__ = ["Turns", "StepBatcher", "ReadAhead"]

_LOG = logging.getLogger(__name__)


class Turns:
    """One unit of model work at a time, steps first, and nothing waits without bound.

    The rule: the waiting unit of the best priority goes next — a Step (:attr:`STEP`) before an
    analysis slice (:attr:`ANALYSIS`) before a read made ahead (:attr:`AHEAD`, :class:`ReadAhead`)
    before a training step (:attr:`TRAIN`); same priority, first come, first served. But a waiting
    analysis slice or training step that has been passed over ``max_passed`` times (other units
    granted the turn while it waited) counts as a Step from then on, and since it arrived before
    the Steps waiting behind it, it goes next after the Steps that were already waiting when it
    came. So while visitors press Step without pause, an analysis or a training step still gets
    the model after at most ``max_passed`` turns plus the Steps queued before it; and since each
    of its units is one slice, a Step waits at most one slice. Reads made ahead never age: they
    are made only while the model has nothing else to do, and dropped when their visitor acts.

    Re-entrant: a thread that holds the turn may take it again (model work nested in a handler
    that already took its turn)."""

    STEP, ANALYSIS, AHEAD, TRAIN = 0, 1, 2, 3
    MAX_PASSED = 4  # turns a waiting analysis slice or training step lets pass before it counts as a Step

    def __init__(self, max_passed: int = MAX_PASSED) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._owner: int | None = None
        self._depth = 0
        self._waiting: dict[int, list[int]] = {}  # ticket -> [priority, times passed over], in arrival order
        self._tickets = 0
        self.max_passed = max_passed

    def _rank(self, ticket: int) -> tuple[int, int]:
        priority, passed = self._waiting[ticket]
        aged = priority != self.AHEAD and passed >= self.max_passed
        return (self.STEP if aged else priority), ticket

    def _first(self) -> int:
        return min(self._waiting, key=self._rank)

    def acquire(self, priority: int = STEP) -> None:
        with self._cond:
            if self._owner == threading.get_ident():
                self._depth += 1
                return
            self._tickets += 1
            me = self._tickets
            self._waiting[me] = [priority, 0]
            while self._busy or self._first() != me:
                self._cond.wait()
            del self._waiting[me]
            for waiting in self._waiting.values():  # everyone still waiting was passed over once more
                waiting[1] += 1
            self._busy, self._owner, self._depth = True, threading.get_ident(), 1

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth:
                return
            self._busy, self._owner = False, None
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._busy

    def mine(self) -> bool:
        """This thread holds the turn."""
        return self._owner == threading.get_ident()

    @contextmanager
    def turn(self, priority: int = STEP) -> Iterator[None]:
        self.acquire(priority)
        try:
            yield
        finally:
            self.release()


class StepBatcher:
    """Visitors' Steps that arrive together run as one batched forward (the model's weights read
    once for all of them): a Step that finds no batch running leads one — it takes the model's
    turn, gathers every Step waiting (up to ``max_batch``, same model) and runs them with
    :func:`~gptviz.generation.batching.step_together` (one new position each); the others wait for their
    result. Alone, a Step runs at once: no waiting window. Fresh sessions' first reads — a
    prompt's prefill, from a Step or from :meth:`read` (Reset) — are gathered the same way and
    run with :func:`~gptviz.generation.batching.read_together`. Anything else (a long prompt, a cropped
    context) runs alone in its turn.

    Each job may bring ``then``, what to do right after it (drawing its visitor's view): the
    leader runs every ``then`` of its batch in the same turn, so no visitor's Python work runs
    beside a forward pass (see :mod:`gptviz.ui.serving` for why that matters)."""

    def __init__(self, turns: Turns, max_batch: int = 16) -> None:
        self.turns, self.max_batch = turns, max_batch
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._leading = False
        self.batches: list[int] = []  # sizes of recent batches (for the load benchmark)
        self.last_shared = -math.inf  # time.monotonic() of the last batch of more than one visitor's Steps

    #: Seconds after a batch of several visitors' Steps during which :meth:`crowded` stays true.
    CROWD_S = 2.0

    def crowded(self) -> bool:
        """Steps are waiting or running, or several visitors' Steps ran in one batch in the last
        :attr:`CROWD_S` seconds (a class is stepping together)."""
        with self._cond:
            return bool(self._queue) or self._leading or time.monotonic() - self.last_shared < self.CROWD_S

    def step(self, session: GenerationSession, then: Callable[[], Any] | None = None) -> Any:
        """One step of ``session`` (its visitor's lock held by the caller), then ``then()`` in the
        same turn; returns what ``then`` returned (None without it)."""
        return self._submit(_Job(session, then, step=True))

    def read(self, session: GenerationSession, then: Callable[[], Any]) -> Any:
        """``then()`` (a view of ``session``, its visitor's lock held) in a turn; a fresh session's
        prompt is read first, batched with other visitors' reads, so ``then`` finds it read."""
        return self._submit(_Job(session, then, step=False))

    def _submit(self, job: "_Job") -> Any:
        if not job.batchable() or self.turns.mine():  # a caller inside its own turn runs alone
            with self.turns.turn(Turns.STEP):
                job.run_alone()
            return job.result()
        with self._cond:
            self._queue.append(job)
            while not job.done and self._leading:
                self._cond.wait()
            if job.done:
                return job.result()
            self._leading = True  # this thread leads the next batch
        try:
            with self.turns.turn(Turns.STEP):
                with self._cond:
                    batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._run(batch)
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()
        return job.result()

    def _run(self, batch: list["_Job"]) -> None:
        groups: dict[int, list[_Job]] = {}
        for job in batch:
            groups.setdefault(id(job.session.model), []).append(job)
        for jobs in groups.values():
            fresh = [j for j in jobs if j.session.fresh]
            ready = [j for j in jobs if j.step and j.session.batchable]
            # a Step keeps the logits its read gave; a view (Reset) keeps the rows and the cache only
            _together([j for j in fresh if j.step], lambda ss: read_together(ss, keep_logits=True))
            _together([j for j in fresh if not j.step], lambda ss: read_together(ss, keep_logits=False))
            _together(ready, step_together)
            for j in jobs:
                if j.done:
                    continue
                if j in ready:
                    j.draw()
                else:  # read: its view; a fresh session's step: from the logits just read; else alone
                    j.run_alone()
        self.batches = (self.batches + [len(batch)])[-256:]
        if len(batch) > 1:
            self.last_shared = time.monotonic()


def _together(jobs: list["_Job"], run: Callable[[list[GenerationSession]], Any]) -> None:
    """``run`` on the jobs' sessions at once; an error goes to each of those visitors' threads."""
    try:
        run([j.session for j in jobs])
    except BaseException as e:  # noqa: BLE001 - handed to each visitor's own thread
        for j in jobs:
            j.finish(error=e)


class _Job:
    def __init__(self, session: GenerationSession, then: Callable[[], Any] | None, step: bool) -> None:
        self.session, self.then, self.step = session, then, step
        self.done, self.value, self.error = False, None, None

    def batchable(self) -> bool:
        return self.session.fresh or (self.step and self.session.batchable)

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.done, self.value, self.error = True, value, error

    def draw(self) -> None:
        """Its ``then``, after its step."""
        try:
            self.finish(self.then() if self.then is not None else None)
        except BaseException as e:  # noqa: BLE001 - handed to the visitor's own thread
            self.finish(error=e)

    def run_alone(self) -> None:
        if self.step:
            try:
                self.session.step(1)
            except BaseException as e:  # noqa: BLE001
                self.finish(error=e)
                return
        self.draw()

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class ReadAhead:
    """NEW (latency): the next step's read of visitors who just acted, made while the model has
    nothing else to do, so that their next Step runs no forward — only the choice of the token
    and the drawing (~10 ms instead of ~45 for gpt2-small on two cores).

    :meth:`want` is called after an action, once the visitor's lock is free. A worker thread takes
    the model's turn at the lowest priority (:attr:`Turns.AHEAD`: after every waiting Step and
    analysis slice), takes each wanted visitor's lock without waiting (a visitor acting now is
    skipped: its own event does the work) and reads the sessions that can be read so —
    :attr:`~gptviz.generation.session.GenerationSession.batchable` — in one batched forward
    (:func:`~gptviz.generation.batching.next_reads_together`). The read is the one the step would make
    (same numbers: tests), kept in the session and counted in its memory budget; an Undo, Reset or
    new prompt drops it. At most one read ahead per visitor's action; ``enabled=False``: none.

    Only while Steps come one at a time: when ``crowded()`` says visitors' Steps are being
    batched (a class stepping together: :meth:`StepBatcher.crowded`), the wanted reads are
    dropped — their Steps batch better than reads made one visitor at a time (measured: 16
    visitors × 8 Steps, p95 0.41 s without reads ahead, 0.72 s with them)."""

    def __init__(self, turns: Turns, max_batch: int = 16, enabled: bool = True,
                 crowded: Callable[[], bool] = lambda: False) -> None:
        self.turns, self.max_batch, self.enabled, self.crowded = turns, max_batch, enabled, crowded
        self._cond = threading.Condition()
        # id(visitor) -> weak reference to it (.lock, .session), in arrival order: a visitor who
        # leaves is not kept alive by a read it no longer needs
        self._wanted: dict[int, weakref.ref] = {}
        self._worker: threading.Thread | None = None
        self._busy = False  # the worker is reading
        self.reads = 0  # sessions read ahead so far (tests, the load benchmark)

    def want(self, visitor: Any) -> None:
        """Read ``visitor.session``'s next step ahead when the model is free (its lock not held
        by the caller)."""
        if not self.enabled:
            return
        with self._cond:
            self._wanted[id(visitor)] = weakref.ref(visitor)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="gptviz-read-ahead", daemon=True)
                self._worker.start()
                atexit.register(self.close)  # not in the middle of a forward pass when Python exits
            self._cond.notify_all()

    def idle(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is wanted or being read (tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._wanted and not self._busy, timeout)

    def close(self) -> None:
        """Stop the worker (after the read it is making, if any); later wants are ignored."""
        with self._cond:
            self.enabled = False
            self._wanted.clear()
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._wanted) or not self.enabled)
                if not self.enabled:
                    return
                keys = list(self._wanted)[: self.max_batch]
                refs = [self._wanted.pop(k) for k in keys]
                self._busy = True
            try:
                with self.turns.turn(Turns.AHEAD):
                    self._read(refs)
            except Exception:  # noqa: BLE001 - a read ahead is only a head start: the step reads itself
                _LOG.warning("a read ahead failed; the visitors' next Steps read for themselves", exc_info=True)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _read(self, refs: list[weakref.ref]) -> None:
        if self.crowded():
            return
        held = [v for v in (r() for r in refs) if v is not None and v.lock.acquire(blocking=False)]
        try:
            groups: dict[int, list[GenerationSession]] = {}
            for v in held:
                s = v.session
                if s is not None and s.batchable:
                    groups.setdefault(id(s.model), []).append(s)
            for sessions in groups.values():
                next_reads_together(sessions)
                self.reads += len(sessions)
        finally:
            for v in held:
                v.lock.release()
