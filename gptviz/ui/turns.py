"""Turns on the shared model: one unit of model work at a time, Steps first, and visitors' Steps
that arrive together batched into one forward."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..generation import GenerationSession, step_together

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
    turn, gathers every Step waiting (up to ``max_batch``, same model, one new position each)
    and runs them with :func:`~gptviz.generation.step_together`; the others wait for their
    result. Alone, a Step runs at once: no waiting window. Steps that cannot be batched (a
    prefill, a cropped context) run alone in their turn.

    Each Step may bring ``then``, what to do right after it (drawing its visitor's view): the
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
        job = _Job(session, then)
        if not session.batchable or self.turns.mine():  # a caller inside its own turn steps alone
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
            ready = [j for j in jobs if j.session.batchable]
            try:
                step_together([j.session for j in ready])
            except BaseException as e:  # noqa: BLE001 - handed to each visitor's own thread
                for j in ready:
                    j.finish(error=e)
            for j in ready:
                if not j.done:
                    j.draw()
            for j in jobs:
                if not j.done:  # changed meanwhile (cannot happen under the visitor's lock): alone
                    j.run_alone()
        self.batches = (self.batches + [len(batch)])[-256:]


class _Job:
    def __init__(self, session: GenerationSession, then: Callable[[], Any] | None) -> None:
        self.session, self.then = session, then
        self.done, self.value, self.error = False, None, None

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.done, self.value, self.error = True, value, error

    def draw(self) -> None:
        """Its ``then``, after its step."""
        try:
            self.finish(self.then() if self.then is not None else None)
        except BaseException as e:  # noqa: BLE001 - handed to the visitor's own thread
            self.finish(error=e)

    def run_alone(self) -> None:
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
