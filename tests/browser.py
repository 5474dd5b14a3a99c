"""What the Chromium tests share: where the browser is, how it starts, and reading plot titles.

Importing this from a test module fails it under CI when Debian's chromium is missing (CI must
run the browser tests) and skips it elsewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("GPTVIZ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 120_000

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"chromium not found at {CHROMIUM}: CI must run the browser tests", pytrace=False)
    pytest.skip(f"chromium not found at {CHROMIUM} (install Debian's chromium)", allow_module_level=True)


def title(page, elem_id: str) -> str:
    """The text of the plotly title in ``#elem_id`` (SVG text: not inner_text)."""
    return page.evaluate(f"() => document.querySelector('#{elem_id} .gtitle')?.textContent ?? ''")


#: Page function: whether the plotly title in ``#id`` matches the regular expression ``pattern``.
TITLE_MATCHES = """([id, pattern]) => new RegExp(pattern).test(document.querySelector(`#${id} .gtitle`)?.textContent ?? '')"""


def wait_title(page, elem_id: str, pattern: str) -> str:
    """Wait until the plotly title in ``#elem_id`` matches the regular expression ``pattern``; its text."""
    page.wait_for_function(TITLE_MATCHES, arg=[elem_id, pattern], timeout=TIMEOUT_MS)
    return title(page, elem_id)
