"""HTML the views share: escaping, token chips, the model-code view. Every text is escaped."""

from __future__ import annotations

import ast
import functools
import html
import re

from ..analysis.inside import model_source
from ..tokenizer import display_text, get_encoding, label, token_piece

__all__ = ["esc", "chips_html", "code_html", "md_code", "tok", "note"]

CHIP_COLORS = ("#FFE3C2", "#CFE6FA", "#D7F0D0", "#F6D5EA", "#FFF2B3", "#E0DAF8")
CODE_ABOVE, CODE_BELOW = 8, 15  # lines of source shown around the highlighted one


def esc(text: str) -> str:
    """HTML-escape, including the characters gr.HTML's template engine would interpret."""
    return html.escape(text).replace("{", "&#123;").replace("}", "&#125;").replace("$", "&#36;")


def note(message: str) -> str:
    """A placeholder line where chips will be."""
    return f'<div class="chips note">{esc(message)}</div>'


def chips_html(ids: list[int], enc=None, *, limit: int, generated_from: int | None = None,
               unseen_before: int = 0, shade: list[float] | None = None, sampled: set[int] | None = None,
               highlight: int | None = None) -> str:
    """Token chips: the piece and its id, coloured by position.

    ``generated_from``: ids from this index on are generated (drawn as such, the last one
    outlined); ``unseen_before``: earlier ids lie outside the model's context (dimmed);
    ``limit``: at most this many chips are drawn (the count still covers all); ``shade``: a
    value in [0, 1] per chip drawn as its background intensity (saliency) instead of the colours;
    ``sampled``: positions of tokens drawn by sampling (marked as such); ``highlight``: the
    generated token outlined (default: the last).
    """
    enc = enc or get_encoding()
    out, outlined = [], len(ids) - 1 if highlight is None else highlight
    for k, token_id in enumerate(ids[:limit]):
        p = token_piece(token_id, enc)
        text, kind = display_text(p)
        generated = generated_from is not None and k >= generated_from
        classes = ["chip", kind, "gen" if generated else "", "last" if generated and k == outlined else "",
                   "unseen" if k < unseen_before else "", "sampled" if sampled and k in sampled else ""]
        extra = " · special token" if p.special else " · partial UTF-8 (part of a character)" if p.partial else ""
        title = f"position {k} · id {token_id} · bytes {p.hex}{extra}" + (" · sampled" if sampled and k in sampled
                                                                            else "")
        if shade is not None and k < len(shade):
            color = f"rgba(230, 120, 20, {0.08 + 0.8 * max(0.0, min(1.0, shade[k])):.2f})"
            title += f" · saliency {shade[k]:.2f}"
        else:
            color = CHIP_COLORS[k % len(CHIP_COLORS)]
        out.append(
            f'<span class="{" ".join(c for c in classes if c)}" style="background:{color}" title="{esc(title)}">'
            f'{esc(text)}<span class="tid">{token_id}</span></span>'
            + ("<br>" if "\n" in p.text and not p.partial else "")  # a newline token ends the line of chips
        )
    if len(ids) > limit:
        out.append(f'<div class="note">… and {len(ids) - limit:,} more tokens (the first {limit:,} are drawn)</div>')
    return '<div class="chips">' + "".join(out) + "</div>"


def md_code(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def tok(token_id: int) -> str:
    """A token inline in a summary (HTML)."""
    return f'<span class="tok">{esc(label(token_id, None, 20))}</span>'


@functools.cache
def _definitions() -> tuple[tuple[int, int, str], ...]:
    """(first line, last line, qualified name) of every class and function of gptviz/model.py."""
    source, first = model_source()
    found: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef)):
                found.append((child.lineno + first - 1, child.end_lineno + first - 1, prefix + child.name))
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source), "")
    return tuple(found)


def code_html(line: int) -> str:
    """gptviz/model.py around ``line`` with that line highlighted, headed by the class or
    function holding it."""
    source, first = model_source()
    lines = source.splitlines()
    last = first + len(lines) - 1
    line = min(max(line, first), last)
    lo = max(first, min(line - CODE_ABOVE, last - CODE_ABOVE - CODE_BELOW))
    hi = min(last, lo + CODE_ABOVE + CODE_BELOW)
    where = max((d for d in _definitions() if d[0] <= line <= d[1]), key=lambda d: d[0], default=None)
    rows = "".join(f'<div class="row{" hl" if n == line else ""}"><span class="ln">{n}</span>'
                   f"{esc(lines[n - first])}</div>" for n in range(lo, hi + 1))
    head = "<b>gptviz/model.py</b>" + (f" · {esc(where[2])}" if where else "") + f" · line {line} highlighted"
    return f'<div class="code-head">{head}</div><div class="code"><div class="lines">{rows}</div></div>'
