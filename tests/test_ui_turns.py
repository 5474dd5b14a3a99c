"""Turns on the shared model: one at a time, waiting Steps before waiting analyses, re-entrant;
reads made ahead after both; analyses and training steps wait a bounded number of turns."""

from __future__ import annotations

import gc
import threading
import time

from gptviz.ui.turns import ReadAhead, Turns

from .conftest import count_forwards


def test_waiting_steps_go_before_waiting_analyses():
    turns, order = Turns(), []
    turns.acquire(Turns.ANALYSIS)  # an analysis slice is running

    def wait(name, priority):
        with turns.turn(priority):
            order.append(name)

    threads = [threading.Thread(target=wait, args=("analysis", Turns.ANALYSIS))]
    threads[0].start()
    time.sleep(0.2)  # the analysis waits first ...
    threads += [threading.Thread(target=wait, args=(f"step {k}", Turns.STEP)) for k in range(3)]
    for t in threads[1:]:
        t.start()
        time.sleep(0.05)
    time.sleep(0.2)
    turns.release()
    for t in threads:
        t.join(10)
    assert order == ["step 0", "step 1", "step 2", "analysis"]  # ... yet every Step goes first, in order
    assert not turns.locked()


def _steppers_without_pause(turns, n, stop, granted):
    """``n`` visitors pressing Step without pause: each takes a turn, works 2 ms, asks again at once
    (for at most 10 s: where waiting work starves, the test ends and fails instead of hanging)."""
    deadline = time.monotonic() + 10

    def press():
        while not stop.is_set() and time.monotonic() < deadline:
            with turns.turn(Turns.STEP):
                granted.append("step")
                time.sleep(0.002)

    threads = [threading.Thread(target=press) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_an_analysis_or_training_step_waits_a_bounded_number_of_turns_behind_steps_without_pause():
    """Today's rule (Turns' docstring): passed over max_passed times, it counts as a Step and goes
    after the Steps already waiting when it came: at most max_passed + n_steppers step turns."""
    for priority in (Turns.ANALYSIS, Turns.TRAIN):
        turns, stop, granted = Turns(), threading.Event(), []
        steppers = _steppers_without_pause(turns, 4, stop, granted)
        time.sleep(0.1)  # the class is stepping
        waited = []
        for _ in range(5):  # five slices one after another, each asked for while Steps keep coming
            asked = len(granted)
            with turns.turn(priority):
                waited.append(len(granted) - asked)
                granted.append("slice")
                time.sleep(0.002)
        stop.set()
        for t in steppers:
            t.join(10)
        assert max(waited) <= Turns.MAX_PASSED + 4, waited
        assert granted.count("step") > 5 * max(waited)  # the Steps kept going meanwhile


def test_reads_made_ahead_do_not_age():
    turns = Turns(max_passed=1)
    turns.acquire(Turns.STEP)
    order = []

    def wait(name, priority):
        with turns.turn(priority):
            order.append(name)

    ahead = threading.Thread(target=wait, args=("ahead", Turns.AHEAD))
    ahead.start()
    time.sleep(0.1)
    analyses = [threading.Thread(target=wait, args=(f"analysis {k}", Turns.ANALYSIS)) for k in range(3)]
    for t in analyses:
        t.start()
        time.sleep(0.05)
    turns.release()
    for t in [ahead, *analyses]:
        t.join(10)
    assert order == ["analysis 0", "analysis 1", "analysis 2", "ahead"]  # passed over three times, still last


def test_one_at_a_time_and_reentrant():
    turns, inside, most = Turns(), [0], [0]

    def work():
        for _ in range(20):
            with turns.turn():
                with turns.turn():  # nested model work in the same thread: no deadlock
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    time.sleep(0.001)
                    inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 1 and not turns.locked() and not turns.mine()


class _Visitor:
    """What ReadAhead reads of a visitor: its lock and its session."""

    def __init__(self, session):
        self.lock, self.session = threading.Lock(), session


def _stepped(model, enc, prompt="Hello, I am", n=2):
    from gptviz.generation.session import GenerationSession

    s = GenerationSession(model, enc, prompt)
    s.step(n)
    return s


def test_reads_ahead_wait_behind_steps_and_analyses_and_serve_the_next_step(tiny_model, enc, monkeypatch):
    turns = Turns()
    ahead = ReadAhead(turns)
    try:
        a, b = _Visitor(_stepped(tiny_model, enc)), _Visitor(_stepped(tiny_model, enc, "The"))
        solo = _stepped(tiny_model, enc, n=3)
        order = []
        turns.acquire(Turns.STEP)  # a Step is running
        waiter = threading.Thread(target=lambda: (turns.acquire(Turns.ANALYSIS), order.append("analysis"),
                                                  time.sleep(0.2), turns.release()))
        waiter.start()
        time.sleep(0.1)
        ahead.want(a)
        ahead.want(b)
        time.sleep(0.2)
        assert ahead.reads == 0  # nothing read while the model is taken ...
        turns.release()
        assert ahead.idle() and order == ["analysis"]  # ... nor before the waiting analysis
        assert ahead.reads == 2 and not a.session.batchable and not b.session.batchable  # both read, in one go
        calls = count_forwards(monkeypatch, tiny_model)
        a.session.step(1)
        assert calls[0] == 0 and a.session.ids == solo.ids  # the read ahead is the step's own read
        waiter.join(5)
    finally:
        ahead.close()


def test_reads_ahead_skip_busy_and_gone_visitors_and_can_be_off(tiny_model, enc):
    turns = Turns()
    ahead = ReadAhead(turns)
    off = ReadAhead(turns, enabled=False)
    try:
        busy, empty, later = _Visitor(_stepped(tiny_model, enc)), _Visitor(None), _Visitor(_stepped(tiny_model, enc))
        with busy.lock:  # acting now: its own event reads
            ahead.want(busy)
            ahead.want(empty)
            assert ahead.idle()
        assert ahead.reads == 0 and busy.session.batchable
        gone = _Visitor(_stepped(tiny_model, enc))
        turns.acquire(Turns.STEP)
        ahead.want(gone)
        del gone  # left before the model was free: not kept alive, not read
        gc.collect()
        turns.release()
        assert ahead.idle() and ahead.reads == 0
        off.want(later)
        assert off.idle() and later.session.batchable and off.reads == 0
    finally:
        ahead.close()


def test_no_reads_ahead_while_a_class_steps_together(tiny_model, enc):
    from gptviz.ui.turns import StepBatcher

    turns = Turns()
    batcher = StepBatcher(turns)
    ahead = ReadAhead(turns, crowded=batcher.crowded)
    try:
        v = _Visitor(_stepped(tiny_model, enc))
        others = [_stepped(tiny_model, enc, p) for p in ("The", "Once upon")]
        threads = [threading.Thread(target=batcher.step, args=(s,)) for s in others]
        with turns.turn():  # both Steps wait for the model, then run as one batch
            for t in threads:
                t.start()
            time.sleep(0.2)
        for t in threads:
            t.join(10)
        assert batcher.batches[-1] == 2 and batcher.crowded()
        ahead.want(v)
        assert ahead.idle() and ahead.reads == 0 and v.session.batchable  # left to be batched with the others'
        batcher.last_shared -= batcher.CROWD_S  # some seconds later, Steps come one at a time again
        batcher.step(v.session)
        assert batcher.batches[-1] == 1 and not batcher.crowded()
        ahead.want(v)
        assert ahead.idle() and ahead.reads == 1 and not v.session.batchable
    finally:
        ahead.close()
