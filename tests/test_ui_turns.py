"""Turns on the shared model: one at a time, waiting Steps before waiting analyses, re-entrant."""

from __future__ import annotations

import threading
import time

from gptviz.ui.turns import Turns


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
