"""Fair turns under a class that never pauses: ``python -m gptviz.tools.benchmark --fair``.

Starts this checkout's ``python app.py`` (and with ``--against DIR`` another checkout's, one
after the other on the same machine; see :mod:`gptviz.tools.loadtest`) and measures what the
classroom issue and the training issue ask of the turns:

* ``analyses``: each analysis (``/precision``, ``/ablate "0.1, 3.*"``, ``/shapes`` with every
  block) on a ~990-token prompt, first alone, then while 4 visitors press Step without pause
  (each stepper's next Step goes as soon as its last one answered, until the analysis is back):
  the analysis' time beside its time alone, and the steppers' p50/p95;
* ``training``: 8 visitors × 12 Steps each without pause, first with nobody training, then
  while a ninth visitor trains the Train view's one-minute preset: the steppers' p95 with the
  training beside their p95 without it (the issue's bound: within 1.5×).

Every loop is bounded (a stepper stops after ``MAX_STEPS`` Steps even if the analysis hangs).
Times are printed, never asserted: on a shared machine, compare the ratios of one run.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from .loadtest import LONG_PROMPT, ROOT, _pcts, _together, app

#: A stepper's bound: it stops after this many Steps whatever the analysis does.
MAX_STEPS = 400
#: The analyses, as (name, endpoint, arguments).
ANALYSES = [("precision", "/precision", (LONG_PROMPT,)), ("ablation", "/ablate", (LONG_PROMPT, "0.1, 3.*")),
            ("shapes", "/shapes", (LONG_PROMPT, True))]
#: The Train view's inputs for the one-minute preset on The Verdict (the Parameters fields unused).
TRAIN_ARGS = ("The Verdict", "", None, "one-minute", 8, 0.002, 8, 128, 128,
              50257, 1024, 768, 12, 12, 0.1, False, False)


def _steps_until(client: Any, prompt: str, done: threading.Event, limit: int = MAX_STEPS) -> list[float]:
    """Steps without pause until ``done`` (at most ``limit``): seconds per answer, the prefill left out."""
    client.predict(prompt, 0, 0, api_name="/reset")
    times = []
    for _ in range(limit):
        if done.is_set():
            break
        t = time.perf_counter()
        client.predict(prompt, 0, 0, api_name="/step")
        times.append(time.perf_counter() - t)
    return times[1:]


def _beside_steppers(make: Callable[[], Any], work: Callable[[Any], None], steppers: int) -> tuple[float, list[float]]:
    """``work(client)`` in one visitor while ``steppers`` others step without pause: its seconds
    and the steppers' answer times."""
    done = threading.Event()

    def visitor(k: int) -> Any:
        c = make()
        try:
            if k == steppers:
                time.sleep(0.5)  # the steppers are going
                t = time.perf_counter()
                work(c)
                return time.perf_counter() - t
            return _steps_until(c, f"Stepper {k} says:", done)
        finally:
            if k == steppers:
                done.set()
            c.close()

    runs = _together(steppers + 1, visitor)
    return runs[steppers], [t for ts in runs[:steppers] for t in ts]


def _train(c: Any) -> None:
    """The one-minute preset, start to finish (the Train view streams a line per optimizer step)."""
    c.predict(*TRAIN_ARGS, api_name="/train")


def run_scenarios(url: str, quick: bool = False) -> dict[str, Any]:
    from gradio_client import Client  # a test-only requirement: imported when the benchmark runs

    def make() -> Any:
        return Client(url, verbose=False, ssl_verify=False)

    result: dict[str, Any] = {}
    warm = make()
    warm.predict("Warm up", 0, 0, api_name="/step")
    for name, endpoint, args in ANALYSES[:1] if quick else ANALYSES:
        t = time.perf_counter()
        warm.predict(*args, api_name=endpoint)
        alone = time.perf_counter() - t
        beside, steps = _beside_steppers(make, lambda c: c.predict(*args, api_name=endpoint), 4)
        result[name] = dict(alone_s=alone, beside_s=beside, ratio=beside / alone) | _pcts(steps)
    warm.close()
    n = 4 if quick else 12

    def stepper(k: int) -> list[float]:
        c = make()
        c.predict(f"Class {k} writes:", 0, 0, api_name="/reset")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            c.predict(f"Class {k} writes:", 0, 0, api_name="/step")
            times.append(time.perf_counter() - t)
        c.close()
        return times[1:]

    without = _pcts([t for ts in _together(8, stepper) for t in ts])
    trainer = make()
    job = trainer.submit(*TRAIN_ARGS, api_name="/train")
    time.sleep(5.0)  # the training has taken its first optimizer steps
    with_training = _pcts([t for ts in _together(8, stepper) for t in ts])
    throughout = not job.done()  # the training still ran when the last stepper finished
    try:
        trainer.predict(api_name="/train_stop")
    except Exception:  # noqa: BLE001 - the training may have finished already
        pass
    job.result(timeout=600)
    trainer.close()
    result["training"] = dict(without_p95=without["p95"], with_p95=with_training["p95"],
                              without_p50=without["p50"], with_p50=with_training["p50"],
                              ratio=with_training["p95"] / without["p95"], throughout=throughout)
    return result


def report(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = [f"{'scenario':<48}" + "".join(f"{n:>22}" for n in names)]

    def row(label: str, get: Callable[[dict[str, Any]], float | None], unit: str) -> None:
        cells = "".join(f"{'—' if (v := get(results[n])) is None else f'{v:.2f}{unit}':>22}" for n in names)
        lines.append(f"{label:<48}{cells}")

    for name, _, _ in ANALYSES:
        row(f"{name} alone", lambda r, a=name: r.get(a, {}).get("alone_s"), " s")
        row(f"{name} beside 4 steppers without pause", lambda r, a=name: r.get(a, {}).get("beside_s"), " s")
        row("  … ratio (bound 2×)", lambda r, a=name: r.get(a, {}).get("ratio"), "×")
        row("  … the steppers' p95", lambda r, a=name: r.get(a, {}).get("p95"), " s")
    row("8 steppers: p95 without a training", lambda r: r["training"]["without_p95"], " s")
    row("8 steppers: p95 while one trains one-minute", lambda r: r["training"]["with_p95"], " s")
    row("  … ratio (bound 1.5×)", lambda r: r["training"]["ratio"], "×")
    for n in names:
        lines.append(f"{n}: the training ran while every stepper stepped: {results[n]['training']['throughout']}")
    return "\n".join(lines)


def main(against: Path | None = None, quick: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, checkout in [("this checkout", ROOT)] + ([(against.name, against)] if against else []):
        with app(checkout) as (url, _pid):
            print(f"{name}: {url}", flush=True)
            results[name] = run_scenarios(url, quick)
            print(results[name], flush=True)
    print(report(results))
    return results
