"""The head-role atlas in a real browser: the app launched in this process (``running_app``),
Debian's chromium through Playwright. Step once, open the atlas, switch the role, click a cell:
the Generate view's block and head sliders move there and its heatmap shows that head.

The default model is the 124M random model (seed 123): measuring its heads takes a few seconds
on a loaded CPU, hence the generous timeouts."""

from __future__ import annotations


import pytest

from gptviz.settings import Settings

from .browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, wait_title  # fails under CI without chromium

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from gptviz.ui import running_app  # noqa: E402


@pytest.fixture(scope="module")
def page():
    with running_app(Settings(device="cpu")) as demo, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(demo.local_url)
            page.wait_for_selector("#tokenize-btn")  # the first tab
            yield page
        finally:
            browser.close()


def slider(page: Page, elem_id: str) -> int:
    return int(float(page.input_value(f"#{elem_id} input[type=range]")))


def cell_position(page: Page, layer: int, head: int) -> tuple[float, float]:
    """The centre of cell (layer, head) of the atlas, in page pixels, from the plot's own axes."""
    return tuple(page.evaluate(
        """([layer, head]) => {
            const gd = document.querySelector('#head-atlas .js-plotly-plot');
            const box = gd.getBoundingClientRect(), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            return [box.left + xa._offset + xa.d2p(head), box.top + ya._offset + ya.d2p(layer)];
        }""",
        [layer, head],
    ))


def test_clicking_an_atlas_cell_shows_that_head(page):
    page.get_by_role("tab", name="Generate").click()
    page.click("#step-btn")
    wait_title(page, "heatmap", r"^Block 0, head 0 ")
    assert (slider(page, "layer-slider"), slider(page, "head-slider")) == (0, 0)

    page.get_by_text("Head roles: what each head does").click()  # opening it measures the heads
    wait_title(page, "head-atlas", r"^Head roles: previous token")
    assert "Strongest previous token heads" in page.text_content("#atlas-top")
    page.locator("#atlas-role").get_by_text("induction", exact=True).click()
    wait_title(page, "head-atlas", r"^Head roles: induction")

    layer, head = 5, 7  # the 124M model: 12 blocks × 12 heads
    page.locator("#head-atlas").scroll_into_view_if_needed()
    page.wait_for_function("() => typeof document.querySelector('#head-atlas .js-plotly-plot')?.on === 'function'")
    x, y = cell_position(page, layer, head)
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    heading = wait_title(page, "heatmap", rf"^Block {layer}, head {head} ")
    assert heading.startswith(f"Block {layer}, head {head} ·")
    page.wait_for_function(
        """([layer, head]) => +document.querySelector('#layer-slider input[type=range]').value === layer
            && +document.querySelector('#head-slider input[type=range]').value === head""",
        arg=[layer, head], timeout=TIMEOUT_MS,
    )
    assert (slider(page, "layer-slider"), slider(page, "head-slider")) == (layer, head)
    wait_title(page, "heatmap-avg", rf"^Block {layer}, average")

    x, y = cell_position(page, 2, 3)  # another cell: jumps again
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    wait_title(page, "heatmap", r"^Block 2, head 3 ")
    assert (slider(page, "layer-slider"), slider(page, "head-slider")) == (2, 3)
