"""Turns on the shared model: one unit of model work at a time, Steps first, and visitors' Steps
(and fresh prompts' reads) that arrive together batched into one forward."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..generation import GenerationSession, read_together, step_together

__all__ = ["Turns", "StepBatcher"]


class Turns:
    """One unit of model work at a time, steps first: a waiting Step (priority 0) goes before
    waiting analyses (priority 1), which run in slices, so a long analysis never holds the
    model for more than one slice while visitors press Step. Same priority: first come, first served.
    Re-entrant: a thread that holds the turn may take it again (model work nested in a handler
    that already took its turn)."""

    STEP, ANALYSIS = 0, 1

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._owner: int | None = None
        self._depth = 0
        self._waiting: list[tuple[int, int]] = []  # (priority, ticket), in arrival order
        self._tickets = 0

    def _first(self) -> tuple[int, int]:
        return min(self._waiting)

    def acquire(self, priority: int = STEP) -> None:
        with self._cond:
            if self._owner == threading.get_ident():
                self._depth += 1
                return
            self._tickets += 1
            me = (priority, self._tickets)
            self._waiting.append(me)
            while self._busy or self._first() != me:
                self._cond.wait()
            self._waiting.remove(me)
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
    :func:`~gptviz.generation.step_together` (one new position each); the others wait for their
    result. Alone, a Step runs at once: no waiting window. Fresh sessions' first reads — a
    prompt's prefill, from a Step or from :meth:`read` (Reset) — are gathered the same way and
    run with :func:`~gptviz.generation.read_together`. Anything else (a long prompt, a cropped
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
