"""The standalone HTML session report: content, escaping, size, and a real offline browser."""

from __future__ import annotations

import html
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import plotly.offline
import pytest

from gptviz import GenerationSession
from gptviz.files.report import save_session_report, session_report_html
from gptviz.tokenizer import show_whitespace

EVIL = "<script>alert(1)</script>"
PROMPT = f"Hello {EVIL}\n\tI am"
#: Upper bound asserted for a 64-step report on the tiny model (plotly.js alone is ~4.8 MB).
MAX_REPORT_BYTES = 6_000_000
CHROMIUM = os.environ.get("GPTVIZ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def session64(tiny_model, enc):
    s = GenerationSession(tiny_model, enc, PROMPT)
    s.step(64)  # beyond the tiny context (64): the last steps are cropped
    return s


@pytest.fixture(scope="module")
def report64(session64):
    return session_report_html(session64, layer=1, head=2, title=f"Report {EVIL}", model_label="tiny <model>")


class _Collector(HTMLParser):
    """Tags, attributes and the text of the chips and table rows, read back from the HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict] = []
        self.chips: list[dict] = []
        self.rows: list[list[str]] = []
        self._chip: dict | None = None
        self._cell: list[str] | None = None
        self._in_t = self._in_row = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "script":
            self.scripts.append(a)
        if tag == "span" and "chip" in cls:
            self._chip = {"id": int(a["data-id"]), "classes": cls, "text": ""}
        elif tag == "span" and "t" in cls and self._chip is not None:
            self._in_t = True
        if tag == "tr":
            self._in_row, self._row = True, []
        if tag == "td" and self._in_row:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "span" and self._in_t:
            self._in_t = False
            self.chips.append(self._chip)
            self._chip = None
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        if tag == "tr" and self._in_row:
            self._in_row = False
            if self._row:
                self.rows.append(self._row)

    def handle_data(self, data):
        if self._in_t:
            self._chip["text"] += data
        if self._cell is not None:
            self._cell.append(data)


def parse(doc: str) -> _Collector:
    c = _Collector()
    c.feed(doc)
    return c


# --------------------------------------------------------------------------- content


def test_chips_hold_every_token_escaped_with_visible_whitespace(report64, session64, enc):
    c = parse(report64)
    assert [chip["id"] for chip in c.chips] == session64.ids
    n = len(session64.prompt_ids)
    assert all("prompt" in chip["classes"] for chip in c.chips[:n])
    assert all("gen" in chip["classes"] for chip in c.chips[n:])
    expected_prompt = [show_whitespace(enc.decode([i])) for i in session64.prompt_ids]
    assert [chip["text"] for chip in c.chips[:n]] == expected_prompt
    assert "".join(expected_prompt) == show_whitespace(PROMPT)
    assert "·<" in expected_prompt and "↵" in expected_prompt and "→" in expected_prompt


def test_nothing_from_the_session_is_markup(report64):
    assert EVIL not in report64 and "<model>" not in report64
    assert html.escape(EVIL) in report64  # the prompt text, and the title
    assert f"<title>Report {html.escape(EVIL)}</title>" in report64
    # The only script elements are plotly.js and the figures' own calls: no src, nothing of ours.
    c = parse(report64)
    assert all("src" not in s for s in c.scripts)


def test_steps_table_lists_each_step_and_its_candidates(report64, session64, enc):
    rows = parse(report64).rows
    assert len(rows) == 64
    for n, (row, r) in enumerate(zip(rows, session64.steps), 1):
        assert row[0] == str(n) and row[1] == str(r.position)
        assert row[3].endswith(f"({r.token_id})")
        assert row[4].startswith("argmax")
        cands = re.findall(r"\((\d+)\) ", row[5])
        assert [int(i) for i in cands] == [c.token_id for c in r.candidates[:5]]
        assert r.candidates[0].token_id == r.token_id  # greedy: the chosen token heads the list
    assert any("cropped" in row[4] for row in rows) and "cropped" not in rows[0][4]


def test_plotly_is_embedded_once_and_nothing_is_fetched(report64):
    js = plotly.offline.get_plotlyjs()
    assert report64.count(js[:2_000]) == 1
    assert report64.count("Plotly.newPlot") >= 3  # heatmap, candidates, logit lens
    ours = report64.replace(js, "")  # plotly.js itself names URLs (map tiles …) that these figures never use
    assert "cdn.plot.ly" not in ours and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", ours)
    assert "https://" not in ours and "http://" not in ours
    assert "default-src 'none'" in report64  # the page itself forbids requests


def test_report_size_for_64_steps(report64):
    size = len(report64.encode("utf-8"))
    ours = size - len(plotly.offline.get_plotlyjs().encode("utf-8"))
    print(f"\nreport, 64 steps on the tiny model: {size / 1e6:.2f} MB ({ours / 1e3:.0f} kB besides plotly.js)")
    assert size < MAX_REPORT_BYTES
    assert ours < 500_000


def test_report_without_lens_or_steps(tiny_model, enc):
    s = GenerationSession(tiny_model, enc, "Hello, I am", logit_lens=False)
    empty = session_report_html(s, layer=0, head=0)
    assert 'id="attention"' in empty and 'id="topk"' not in empty and 'id="lens"' not in empty
    assert "No steps yet" in empty
    s.step(3)
    off = session_report_html(s, layer=0, head=3, top_k=2)
    assert 'id="lens"' not in off and "logit lens was off" in off
    rows = parse(off).rows
    assert len(rows) == 3 and all(len(re.findall(r"\(\d+\) ", row[5])) == 2 for row in rows)


def test_sampled_steps_are_marked(tiny_model, enc):
    s = GenerationSession(tiny_model, enc, "Hello, I am", temperature=1.5, seed=5)
    s.step(4)
    doc = session_report_html(s, layer=0, head=0)
    assert [row[4] for row in parse(doc).rows] == ["sampled"] * 4
    assert "temperature 1.5" in doc and "seed 5" in doc


@pytest.mark.parametrize("kw", [dict(layer=2, head=0), dict(layer=0, head=4), dict(layer=-1, head=0),
                                dict(layer=0, head=0, top_k=0)])
def test_bad_layer_head_or_top_k(tiny_model, enc, kw):
    s = GenerationSession(tiny_model, enc, "Hi")
    with pytest.raises(ValueError):
        session_report_html(s, **kw)


# --------------------------------------------------------------------------- in a browser, offline


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"chromium not found at {CHROMIUM}")
def test_report_opens_offline_in_chromium(session64, tmp_path, enc):
    from playwright.sync_api import sync_playwright

    path = save_session_report(session64, tmp_path / "report.html", layer=1, head=2, title=f"Report {EVIL}")
    errors, dialogs, requests = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context()

            def route(r):
                requests.append(r.request.url)
                r.abort() if not r.request.url.startswith("file:") else r.continue_()

            context.route("**/*", route)
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(path.as_uri())
            page.wait_for_selector("#attention .main-svg", timeout=30_000)
            page.wait_for_selector("#lens .main-svg", timeout=30_000)
            assert page.locator("#attention g.hm image").count() == 1  # the heatmap is drawn
            assert page.locator("#lens g.hm image").count() == 1
            assert page.title() == f"Report {EVIL}"
            assert EVIL in page.locator("pre.text").inner_text()
            chips = page.locator("#tokens .chip .t").all_inner_texts()
            n = len(session64.prompt_ids)
            assert chips[:n] == [show_whitespace(enc.decode([i])) for i in session64.prompt_ids]
            assert len(chips) == len(session64.ids)
            ids = page.locator("#tokens .chip .id").all_inner_texts()
            assert [int(i) for i in ids] == session64.ids

            # A short session: the heatmap's axes show the tokens of EVIL as text (plotly reads
            # a little HTML in labels: the report writes < as an entity, plotly shows "<").
            short = GenerationSession(session64.model, enc, PROMPT)
            short.step(2)
            small = save_session_report(short, tmp_path / "short.html", layer=0, head=0)
            page.goto(small.as_uri())
            page.wait_for_selector("#attention .main-svg", timeout=30_000)
            ticks = page.locator("#attention .ytick text").all_text_contents()  # SVG: no innerText
            assert "·<" in ticks and ")</" in ticks and "script" in ticks
        finally:
            browser.close()
    assert errors == [] and dialogs == []
    assert [u for u in requests if not u.startswith("file:")] == []
