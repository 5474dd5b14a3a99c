"""A classroom against one app: ``python -m gptviz.tools.benchmark --load``.

Starts ``python app.py`` on a free local port (random seed-124M weights, float32, CPU, offline)
— this checkout's, and with ``--against DIR`` also another checkout's (e.g. the commit before a
change, from ``git worktree add``) one after the other on the same machine — and runs the same
scenarios through ``gradio_client``, one client per visitor, printing p50/p95 per scenario and the
ratio between the two apps. Only loopback addresses are used; every loop is bounded.

The clients share the machine's cores with the app (on the 2-core development machine, a class
of 16 clients and the server). ``gradio_client`` builds a TLS context (certifi's CA bundle) for
every call, even to ``http://``: ~60 ms of CPU per call, which stole about a core from the
server while 16 clients stepped. The loopback app is plain HTTP, so the clients skip it
(``ssl_verify=False``): ~7 ms of CPU per call.

Scenarios (from the classroom issue):

* ``alone``: one visitor's ``/step`` answer time (≤ 64 tokens, lens on);
* ``class``: 16 visitors × 8 Steps at once: time per Step;
* ``floor``: ``gradio_client`` itself: ``/detokenize`` of one id (no model work). The client
  polls for the server's messages every 50 ms (``gradio_client.utils.stream_sse_v1plus``), so
  an answer through it costs ~80-90 ms however fast the server is;
* ``alone_http`` and ``class_http``: the same two through Gradio's HTTP API
  (``POST /gradio_api/call/step`` and its event stream, one ``session_hash`` per visitor):
  the server's answer time without the client's polling;
* ``analyses``: 4 visitors stepping while a fifth runs ``/precision``, ``/ablate "0.1, 3.*"`` and
  ``/shapes`` with every block on a ~1,000-token prompt: the steppers' times;
* ``stepn``: 8 visitors × Step ×20 at once: wall time, and whether every visitor got its solo tokens;
* ``memory``: the app's RSS after 40 finished sessions, against its RSS before them;
* ``builders`` (alone: ``--scenario builders``): 4 visitors at once each build a different
  ~1.9 GB random configuration on the Model view and Step it, the app started with
  ``GPTVIZ_MAX_TOTAL_BYTES`` (``--budget``, 4 GB): the app's peak RSS (sampled every 20 ms)
  against the budget, who was refused or released, and whether every Step answered;
* ``browser`` (when Playwright and Chromium are there): Step click → heatmap redrawn, 12 clicks.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]
LONG_PROMPT = " ".join(["the cat sat on the mat and looked at the dog"] * 90)  # 990 tokens


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app(checkout: Path, **extra_env: str) -> Iterator[tuple[str, int]]:
    """``python app.py`` of ``checkout`` on a free port: (url, pid), stopped afterwards."""
    port = _port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GPTVIZ_DEVICE="cpu",
               HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(checkout), **extra_env)
    env.pop("GPTVIZ_WEIGHTS", None)
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=checkout, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"the app of {checkout} exited") from None
                time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _together(n: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(k)`` for k < n in n threads started at once; their results (exceptions re-raised)."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(k: int) -> None:
        try:
            start.wait()
            results[k] = work(k)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _pcts(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    return dict(p50=statistics.median(s), p95=s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))], n=len(s))


def _timed_steps(client: Any, prompt: str, n: int) -> tuple[list[float], list[int]]:
    times, ids = [], []
    for _ in range(n):
        t = time.perf_counter()
        out = client.predict(prompt, 0, 0, api_name="/step")
        times.append(time.perf_counter() - t)
        ids = out[4]["ids"]
    return times, ids


def _http_steps(url: str, session: str, prompt: str, n: int) -> list[float]:
    """``n`` Steps through Gradio's HTTP API (as ``curl`` would): seconds per answer. The API
    wants every input: prompt, block, head, temperature 0 (greedy), top-k 0, top-p 1, seed."""
    import httpx  # gradio's own HTTP client

    times = []
    call = f"{url}gradio_api/call/step"
    with httpx.Client(timeout=120) as http:
        for _ in range(n):
            t = time.perf_counter()
            event = http.post(call, json={"data": [prompt, 0, 0, 0, 0, 1, 0], "session_hash": session}).json()["event_id"]
            with http.stream("GET", f"{call}/{event}") as stream:
                kinds = [line for line in stream.iter_lines() if line.startswith("event:")]
            times.append(time.perf_counter() - t)
            if kinds[-1:] != ["event: complete"]:
                raise RuntimeError(f"/step answered {kinds}")
    return times


def run_scenarios(url: str, pid: int, quick: bool = False) -> dict[str, Any]:
    import psutil
    from gradio_client import Client  # a test-only requirement: imported when the benchmark runs

    def client() -> Any:
        return Client(url, verbose=False, ssl_verify=False)  # loopback, plain HTTP: see the module docstring

    result: dict[str, Any] = {}
    warm = client()
    warm.predict("Warm up", 0, 0, api_name="/step")  # the start-up model is built
    times, _ = _timed_steps(warm, "Hello, I am", 10 if quick else 30)
    result["alone"] = _pcts(times[2:])
    floor = []
    for _ in range(10 if quick else 30):
        t = time.perf_counter()
        warm.predict("464", api_name="/detokenize")
        floor.append(time.perf_counter() - t)
    result["floor"] = _pcts(floor[2:])
    warm.close()
    result["alone_http"] = _pcts(_http_steps(url, "alone-http", "Hello, I am", 10 if quick else 30)[2:])
    together = _together(16, lambda k: _http_steps(url, f"class-http-{k}", f"Visitor {k} writes:", 8)[1:])
    result["class_http"] = _pcts([t for ts in together for t in ts])  # the first of each is a prefill

    def visitor(k: int) -> list[float]:
        c = client()
        c.predict(f"Visitor {k} writes:", 0, 0, api_name="/reset")
        times, _ = _timed_steps(c, f"Visitor {k} writes:", 8)
        c.close()
        return times

    result["class"] = _pcts([t for ts in _together(16, visitor) for t in ts[1:]])  # the first is a prefill

    def analyses_or_steps(k: int) -> list[float]:
        c = client()
        if k == 4:
            t = time.perf_counter()
            c.predict(LONG_PROMPT, api_name="/precision")
            c.predict(LONG_PROMPT, "0.1, 3.*", api_name="/ablate")
            c.predict(LONG_PROMPT, True, api_name="/shapes")
            c.close()
            return [time.perf_counter() - t]
        time.sleep(1.0)  # let the analyses start first
        times, _ = _timed_steps(c, f"Stepper {k}:", 6 if quick else 12)
        c.close()
        return times

    runs = _together(5, analyses_or_steps)
    result["analyses"] = _pcts([t for ts in runs[:4] for t in ts[1:]]) | dict(analyst_s=runs[4][0])

    def long_run(k: int) -> list[int]:
        c = client()
        data = c.predict(f"Long run {k}", 20, 0, 0, api_name="/step_n")[4]  # the step data (same place in both)
        c.close()
        return data["ids"]

    t0 = time.perf_counter()
    together = _together(8, long_run)
    wall = time.perf_counter() - t0
    alone = []
    for k in range(8):
        c = client()
        alone.append(c.predict(f"Long run {k}", 20, 0, 0, api_name="/step_n")[4]["ids"])
        c.close()
    result["stepn"] = dict(wall_s=wall, solo_tokens=together == alone)

    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    for k in range(8 if quick else 40):
        c = client()
        _timed_steps(c, f"Session {k} of many", 4)
        c.close()
    time.sleep(3)  # unload events arrive
    result["memory"] = dict(rss_before_mb=before / 2**20, rss_after_mb=proc.memory_info().rss / 2**20)
    result["browser"] = _browser(url)
    return result


def _browser(url: str, clicks: int = 12) -> dict[str, float] | None:
    """Step click → the heatmap's title shows the new step, timed inside the page (median, min)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    chromium = os.environ.get("GPTVIZ_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=dict(width=1280, height=900))
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_role("tab", name="Generate", exact=True).click()
        page.click("#step-btn")
        page.wait_for_function("() => document.querySelector('#heatmap .gtitle')?.textContent.includes('step 1')")
        times = []
        for k in range(2, clicks + 2):
            ms = page.evaluate(
                """(k) => new Promise(resolve => {
                    const t0 = performance.now();
                    document.querySelector('#step-btn').click();
                    const poll = () => {
                        const title = document.querySelector('#heatmap .gtitle')?.textContent || '';
                        if (title.includes('step ' + k)) resolve(performance.now() - t0);
                        else requestAnimationFrame(poll);
                    };
                    poll();
                })""", k)
            times.append(ms)
            page.wait_for_timeout(300)
        browser.close()
    return dict(median_ms=statistics.median(times), min_ms=min(times))


def report(results: dict[str, dict[str, Any]]) -> str:
    """A table: scenario, each app's numbers, and the ratio (this checkout / the other)."""
    names = list(results)
    lines = [f"{'scenario':<34}" + "".join(f"{n:>22}" for n in names) + ("   ratio" if len(names) == 2 else "")]

    def row(label: str, get: Callable[[dict[str, Any]], float | None], unit: str) -> None:
        values = [get(results[n]) for n in names]
        cells = "".join(f"{'—' if v is None else f'{v:.2f} {unit}':>22}" for v in values)
        ratio = ""
        if len(values) == 2 and None not in values and values[1]:
            ratio = f"   {values[0] / values[1]:.2f}×"
        lines.append(f"{label:<34}{cells}{ratio}")

    row("alone: /step p50", lambda r: r["alone"]["p50"], "s")
    row("alone: /step p95", lambda r: r["alone"]["p95"], "s")
    row("16 visitors x 8 Steps: p50", lambda r: r["class"]["p50"], "s")
    row("16 visitors x 8 Steps: p95", lambda r: r["class"]["p95"], "s")
    row("gradio_client floor: /detokenize p50", lambda r: r.get("floor", {}).get("p50"), "s")
    row("HTTP API: /step alone p50", lambda r: r.get("alone_http", {}).get("p50"), "s")
    row("HTTP API: 16 x 8 Steps p50", lambda r: r.get("class_http", {}).get("p50"), "s")
    row("HTTP API: 16 x 8 Steps p95", lambda r: r.get("class_http", {}).get("p95"), "s")
    row("steppers beside analyses: p50", lambda r: r["analyses"]["p50"], "s")
    row("steppers beside analyses: p95", lambda r: r["analyses"]["p95"], "s")
    row("the analyses themselves", lambda r: r["analyses"]["analyst_s"], "s")
    row("8 visitors x Step x20: wall", lambda r: r["stepn"]["wall_s"], "s")
    row("RSS growth after the sessions", lambda r: r["memory"]["rss_after_mb"] - r["memory"]["rss_before_mb"], "MB")
    row("browser: click → heatmap, median", lambda r: (r["browser"] or {}).get("median_ms"), "ms")
    for n in names:
        lines.append(f"{n}: every visitor got its solo tokens with Step x20 at once: {results[n]['stepn']['solo_tokens']}")
    return "\n".join(lines)


#: The builders' configurations: the 124M one at width 1024 (16 heads) with 27 to 30 blocks, 1.80 to
#: 1.96 GB of float32 weights each, all different.
BUILDERS = [dict(vocab_size=50257, context_length=1024, emb_dim=1024, n_heads=16, n_layers=n, drop_rate=0.1,
                 qkv_bias=False, tie_weights=False) for n in (27, 28, 29, 30)]


def builders(url: str, pid: int, budget: int | None, steps: int = 3) -> dict[str, Any]:
    """4 visitors at once build a ~1.9 GB model each (the Model view's ``/build_model``) and Step
    it ``steps`` times, then each Steps once more: the app's peak RSS, and what each visitor got
    (its build refused or not, and the model each of its Steps ran on: a released visitor's
    Steps go on with the start-up model)."""
    import psutil
    from gradio_client import Client

    proc, peak, done = psutil.Process(pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    def step(c: Any, k: int) -> str:
        return c.predict(f"Builder {k} writes:", 0, 0, api_name="/step")[4]["model"]  # the step data's model

    clients = [Client(url, verbose=False, ssl_verify=False) for _ in BUILDERS]
    step(clients[0], 0)  # the start-up model is built
    rss0 = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def visitor(k: int) -> dict[str, Any]:
        c, out = clients[k], dict(blocks=BUILDERS[k]["n_layers"], refused=None, models=[])
        try:
            c.predict(*BUILDERS[k].values(), "float32", api_name="/build_model")
        except Exception as e:  # noqa: BLE001 - a refusal is a result here
            out["refused"] = str(e)[:400]
        out["models"] = [step(c, k) for _ in range(steps)]
        return out

    t0 = time.perf_counter()
    runs = _together(len(BUILDERS), visitor)
    for k, run in enumerate(runs):  # after every build: who was released meanwhile
        run["models"].append(step(clients[k], k))
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    for c in clients:
        c.close()
    return dict(budget_mb=budget / 1e6 if budget else None, rss_before_mb=rss0 / 1e6,
                peak_rss_mb=peak[0] / 1e6, wall_s=wall, visitors=runs)


def report_builders(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, r in results.items():
        lines.append(f"{name}: 4 builders of ~1.9 GB models at once: peak RSS {r['peak_rss_mb']:.0f} MB, budget "
                     f"{r['budget_mb']:.0f} MB ({r['rss_before_mb']:.0f} MB before the builds), {r['wall_s']:.0f} s")
        for v in r["visitors"]:
            built = f"refused ({v['refused']})" if v["refused"] else "built"
            ran = ["its own" if "custom configuration" in m else "the start-up model" for m in v["models"]]
            lines.append(f"  {v['blocks']} blocks: {built}; its Steps ran on: {', '.join(ran)}")
    return "\n".join(lines)


def main(against: Path | None = None, quick: bool = False, scenario: str = "all",
         budget: int = 4_000_000_000) -> dict[str, Any]:
    """The scenarios (``scenario="builders"``: only that one, the app given ``budget`` as its
    GPTVIZ_MAX_TOTAL_BYTES) against this checkout and, if given, ``against``."""
    results: dict[str, Any] = {}
    env = dict(GPTVIZ_MAX_TOTAL_BYTES=str(budget)) if scenario == "builders" else {}
    for name, checkout in [("this checkout", ROOT)] + ([(f"{against.name}", against)] if against else []):
        with app(checkout, **env) as (url, pid):
            print(f"{name}: {url}", flush=True)
            results[name] = builders(url, pid, budget) if scenario == "builders" else run_scenarios(url, pid, quick)
            print(results[name], flush=True)
    print(report_builders(results) if scenario == "builders" else report(results))
    return results
