"""The real app in a real browser: `python app.py` on a free port, driven by Playwright and
Debian's chromium; plus gradio_client against the same app (one session per client).

Also measures Step click → heatmap redrawn in the browser (printed, never asserted): the
time from the click to the heatmap's title showing the new token span, polled on every
animation frame inside the page.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("GPTVIZ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
HELLO_IDS = ["15496", "11", "314", "716"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"chromium not found at {CHROMIUM}: CI must run the browser tests", pytrace=False)
    pytest.skip(f"chromium not found at {CHROMIUM} (install Debian's chromium)", allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GPTVIZ_DEVICE="cpu",
               HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env.pop("GPTVIZ_WEIGHTS", None)  # the default: random weights, seed 123, offline
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url, t0 = f"http://127.0.0.1:{port}/", time.perf_counter()
        try:
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.perf_counter() - t0 > 90:
                    pytest.fail(f"app.py did not answer (exit code {proc.poll()}); log: {log_path}")
                time.sleep(0.2)
            print(f"\napp.py answered HTTP 200 after {time.perf_counter() - t0:.1f} s")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        page.goto(app_url)
        page.wait_for_selector("#tokenize-btn")
        yield page
        browser.close()


def title(page: Page, elem_id: str) -> str | None:
    return page.evaluate(f"() => document.querySelector('#{elem_id} .gtitle')?.textContent ?? null")


def click_until_redrawn(page: Page, button: str, plot: str = "heatmap") -> float:
    """Click and return the ms until the plot's title changes (checked every animation frame)."""
    return page.evaluate(
        """async ([button, plot]) => {
            const title = () => document.querySelector(`#${plot} .gtitle`)?.textContent ?? null;
            const before = title(), t0 = performance.now();
            document.querySelector(`#${button}`).click();
            while (title() === before) {
                if (performance.now() - t0 > 60000) throw new Error(`${plot} not redrawn`);
                await new Promise(r => requestAnimationFrame(r));
            }
            return performance.now() - t0;
        }""",
        [button, plot],
    )


def wait_title(page: Page, elem_id: str, pattern: str) -> str:
    page.wait_for_function(
        """([id, pattern]) => new RegExp(pattern).test(document.querySelector(`#${id} .gtitle`)?.textContent ?? '')""",
        arg=[elem_id, pattern],
    )
    return title(page, elem_id)


def generated(page: Page) -> int:
    return page.locator("#gen-text .chip.gen[title]").count()


def test_tokenizer_shows_hello_as_four_tokens(page):
    page.get_by_role("tab", name="Tokenizer").click()
    page.fill("#tokenize-input textarea", "Hello, I am")
    page.click("#tokenize-btn")
    page.wait_for_function("() => document.querySelectorAll('#token-chips .chip').length === 4")
    assert page.locator("#token-chips .chip .tid").all_inner_texts() == HELLO_IDS
    assert "4 tokens" in page.inner_text("#token-stats")


def test_steps_update_text_candidates_and_heatmap(page):
    page.get_by_role("tab", name="Generate").click()
    page.wait_for_selector("#step-btn")
    latencies = []
    for k in range(1, 4):
        heat_before, topk_before = title(page, "heatmap"), title(page, "topk-plot")
        latencies.append(click_until_redrawn(page, "step-btn"))
        assert wait_title(page, "topk-plot", rf"^Step {k}:") != topk_before
        assert title(page, "heatmap") != heat_before
        assert re.search(rf"tokens 0–{2 + k}\b", title(page, "heatmap"))  # step k read 4 + k - 1 tokens
        page.wait_for_function(f"() => document.querySelectorAll('#gen-text .chip.gen[title]').length === {k}")
        wait_title(page, "lens-plot", rf"steps 1–{k}$")  # the follow-up figures are drawn too
    assert generated(page) == 3
    assert "computed 1 position instead of 6" in page.inner_text("#kv-readout")

    # Step ×N with N = 3: three more tokens, streamed
    page.fill("#stepn-count input[type=number]", "3")
    page.press("#stepn-count input[type=number]", "Enter")
    page.click("#stepn-btn")
    page.wait_for_function("() => document.querySelectorAll('#gen-text .chip.gen[title]').length === 6")
    wait_title(page, "lens-plot", r"steps 1–6$")

    # Step click → heatmap redrawn, at a human pace (each click once the previous one is fully drawn),
    # at 10-20 tokens and, after a streamed Step ×N, at 55-64 tokens (up to a full 64-token window).
    short = [click_until_redrawn(page, "step-btn") for k in range(7, 17) if wait_lens(page, k)]
    page.fill("#stepn-count input[type=number]", "35")
    page.press("#stepn-count input[type=number]", "Enter")
    page.click("#stepn-btn")
    long = [click_until_redrawn(page, "step-btn") for k in range(52, 62) if wait_lens(page, k)]
    wait_lens(page, 62)
    assert generated(page) == 61 and re.search(r"tokens 0–63\b", title(page, "heatmap"))  # 64 tokens read
    every = latencies + short + long
    print(f"\nStep click → heatmap redrawn (124M seed-124M, random weights; ms): "
          f"4-10 tokens median {statistics.median(latencies):.0f}, 10-20 tokens median {statistics.median(short):.0f}, "
          f"55-64 tokens median {statistics.median(long):.0f}; all {len(every)} clicks median "
          f"{statistics.median(every):.0f}, min {min(every):.0f}, max {max(every):.0f}")
    assert page.locator(".toast-body.error, [data-testid='toast-body'].error").count() == 0


def wait_lens(page: Page, k: int) -> bool:
    """Wait until the logit lens (drawn after the main view) shows step k-1: the page is idle again."""
    wait_title(page, "lens-plot", rf"–{k - 1}$")
    return True


def test_undo_and_reset(page):
    page.get_by_role("tab", name="Generate").click()
    n = generated(page)
    click_until_redrawn(page, "undo-btn")
    page.wait_for_function(f"() => document.querySelectorAll('#gen-text .chip.gen[title]').length === {n - 1}")
    click_until_redrawn(page, "reset-btn")
    page.wait_for_function("() => document.querySelectorAll('#gen-text .chip.gen[title]').length === 0")
    assert page.locator("#gen-text .chip[title]").count() == 4


def test_changing_n_layers_changes_the_total(page):
    page.get_by_role("tab", name="Parameters").click()
    page.wait_for_function("() => document.querySelector('#params-total')?.textContent.includes('163,009,536')")
    page.fill("#cfg-n_layers input", "24")
    # 12 more blocks of 7,085,568 parameters (the source's per-block figure)
    page.wait_for_function("() => document.querySelector('#params-total').textContent.includes('248,036,352')")
    page.fill("#cfg-n_heads input", "7")  # 768 is not divisible by 7: a warning, the last result stays
    page.wait_for_selector("text=n_heads")
    assert "248,036,352" in page.inner_text("#params-total")


def test_gradio_client_one_session_per_client(app_url):
    from gradio_client import Client

    from gptviz.ui.generate import Main
    from gptviz.ui.parameters import Counted
    from gptviz.ui.tokenizer import Tokenized

    step_json = Main._fields.index("step_json")  # outputs come in the order of the view's named outputs

    a, b, alone = (Client(app_url, verbose=False) for _ in range(3))
    assert a.predict("Hello, I am", api_name="/tokenize")[Tokenized._fields.index("tok_ids")] == ", ".join(HELLO_IDS)
    for _ in range(2):
        data_a = a.predict("Hello, I am", 0, 0, api_name="/step")[step_json]
    data_b = b.predict("Once upon a time", 0, 0, api_name="/step")[step_json]
    assert data_a["steps"] == 2 and data_b["steps"] == 1 and data_b["ids"][:4] == [7454, 2402, 257, 640]
    alone.predict("Hello, I am", 0, 0, api_name="/step")
    data_alone = alone.predict("Hello, I am", 0, 0, api_name="/step")[step_json]
    assert data_alone["ids"] == data_a["ids"]  # what b did changed nothing for a
    assert a.predict(0, 0, api_name="/undo")[step_json]["steps"] == 1
    assert a.predict("Hello, I am", 0, 0, api_name="/reset")[step_json]["ids"] == [int(i) for i in HELLO_IDS]
    total = a.predict(50257, 1024, 768, 12, 12, 0.1, False, True, api_name="/params")[Counted._fields.index("p_total")]
    assert "124,412,160" in total
