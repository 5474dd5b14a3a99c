"""A standalone HTML report of one generation session, for teachers' handouts.

:func:`session_report_html` returns one HTML document that works offline when opened from
disk: the prompt and the generated tokens as chips (whitespace made visible, each with its
id), a compact table of every step's top candidates, the final step's candidates as bars,
the chosen block/head's attention heatmap over the context the last step read, and the logit
lens of the steps (when the session recorded it). Plotly's JavaScript is embedded once
(~4.8 MB), so nothing is fetched; a Content-Security-Policy forbids every network request
anyway. Every text that comes from the session is escaped (a token can be ``<script>``).

    html = session_report_html(session, layer=5, head=1, title="Lesson 3")
    save_session_report(session, Path("report.html"), layer=5, head=1)

Sizes (tiny test model, 64 steps): ~5 MB, almost all of it plotly.js; see tests/test_report.py.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Sequence

import plotly.graph_objects as go

from ..formatting import percent
from ..generation.session import GenerationSession, StepRecord
from ..plots.generation import attention_figure, logit_lens_figure, topk_figure
from ..tokenizer import display_text, label, token_piece

__all__ = ["session_report_html", "save_session_report", "DEFAULT_LENS_STEPS", "display_piece"]

#: The logit lens shows at most this many steps (the latest ones) …
DEFAULT_LENS_STEPS = 256
#: … in figures of this many steps each (readable cells on a page).
LENS_CHUNK = 24
#: Pixel heights of the figures.
HEATMAP_HEIGHT, TOPK_HEIGHT = 560, 380

#: No request of any kind leaves the page: scripts and styles are inline, images data: URIs.
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src data: blob:; font-src data:")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1f2430; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; }
.meta { color: #555c6b; font-size: 14px; } .meta code { font-size: 13px; }
.chips { line-height: 2.2; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px; }
.chip { display: inline-block; border: 1px solid #c9ced8; border-radius: 5px; padding: 0 4px; margin: 1px 2px;
        background: #f4f6fa; line-height: 1.5; white-space: pre; }
.chip.gen { background: #e3f5ee; border-color: #8fd3b8; }
.chip.special { background: #fff1d6; border-color: #e0b252; } .chip.partial { background: #f7e8f7; }
.chip .id { font-size: 10px; color: #6b7385; margin-left: 3px; vertical-align: sub; }
pre.text { white-space: pre-wrap; background: #f4f6fa; padding: 10px; border-radius: 6px; font-size: 14px; }
table.steps { border-collapse: collapse; font-size: 13px; width: 100%; }
table.steps th, table.steps td { border-bottom: 1px solid #e5e9f0; padding: 3px 6px; text-align: left;
                                 vertical-align: top; }
table.steps td.tok, table.steps td.cands { font-family: ui-monospace, Menlo, Consolas, monospace;
                                           white-space: pre-wrap; }
.cand { margin-right: 10px; } .cand.chosen { font-weight: bold; color: #b3261e; }
.cand .p { color: #6b7385; } .note { color: #8a5a00; font-size: 14px; }
"""


def display_piece(token_id: int, enc: Any) -> tuple[str, str]:
    """(visible text of a token, CSS class): whitespace and control characters made visible as
    the app does, partial UTF-8 as its bytes (``<0xE2 0x80>``), ``<|endoftext|>`` marked special."""
    if not 0 <= token_id < enc.n_vocab:
        return f"<{token_id}>", "special"
    return display_text(token_piece(token_id, enc))


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _plot_label(token_id: int, enc: Any, width: int) -> str:
    """A token for plotly text: shortened, then its ``& < >`` written as entities (plotly reads
    a little HTML in labels and shows entities as the characters)."""
    return html.escape(label(token_id, enc, width), quote=False)


def _chip(token_id: int, position: int, enc: Any, kind: str) -> str:
    text, extra = display_piece(token_id, enc)
    cls = " ".join(c for c in ("chip", kind, extra) if c)
    return (f'<span class="{cls}" data-id="{token_id}" title="id {token_id}, position {position}">'
            f'<span class="t">{_esc(text)}</span><span class="id">{token_id}</span></span>')


def _steps_table(session: GenerationSession, top_k: int) -> str:
    enc, ids = session.enc, session.ids
    rows = []
    for n, r in enumerate(session.steps, 1):
        read, _ = display_piece(ids[r.position - 1], enc)
        chosen, _ = display_piece(r.token_id, enc)
        cands = " ".join(
            f'<span class="cand{" chosen" if c.token_id == r.token_id else ""}">{_esc(display_piece(c.token_id, enc)[0])}'
            f' <span class="p">({c.token_id}) {_esc(percent(c.prob))}</span></span>'
            for c in r.candidates[:top_k]
        )
        how = "sampled" if r.sampled else "argmax"
        crop = " · cropped" if r.cropped else ""
        rows.append(f'<tr><td>{n}</td><td>{r.position}</td><td class="tok">{_esc(read)}</td>'
                    f'<td class="tok">{_esc(chosen)} <span class="p">({r.token_id})</span></td>'
                    f'<td>{how}{crop}</td><td class="cands">{cands}</td></tr>')
    head = ("<tr><th>step</th><th>position</th><th>read</th><th>chosen (id)</th><th>how</th>"
            f"<th>top {top_k} candidates (id) probability</th></tr>")
    return f'<table class="steps"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _figure_html(fig: go.Figure, div_id: str, first: bool) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=bool(first), div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _lens_figure(session: GenerationSession, steps: Sequence[StepRecord], first_step: int) -> go.Figure:
    enc, ids = session.enc, session.ids
    n_layers = len(steps[-1].lens)
    return logit_lens_figure(
        [[_plot_label(e.token_id, enc, 8) for e in r.lens] for r in steps],
        [[e.prob for e in r.lens] for r in steps],
        [_plot_label(ids[r.position - 1], enc, 10) for r in steps],
        height=160 + 28 * n_layers, max_chars=64,
        title=f"Logit lens: each block's top-1 next token, steps {first_step + 1}–{first_step + len(steps)}",
    )


def _sampling_text(session: GenerationSession) -> str:
    t = getattr(session, "temperature", 0.0) or 0.0
    if t <= 0:
        return "greedy (argmax, as the source)"
    parts = [f"sampling: temperature {t:g}"]
    if getattr(session, "sample_top_k", None):
        parts.append(f"top-k {session.sample_top_k}")
    if getattr(session, "top_p", None) is not None:
        parts.append(f"top-p {session.top_p:g}")
    parts.append(f"seed {session.seed}")
    return ", ".join(parts)


def _figures(session: GenerationSession, layer: int, head: int, top_k: int, lens_steps: int,
             attn_window: int | None) -> list[str]:
    """The report's figures as HTML: attention heatmap, the last step's candidates, the logit lens.
    plotly.js goes with the first one only."""
    enc, ids, steps = session.enc, session.ids, session.steps
    figures: list[str] = []
    weights, positions = session.attention(layer, attn_window)
    span = f"tokens {positions[0]}–{positions[-1]}" + (f", read by step {len(steps)}" if steps else ", the prompt")
    heat = attention_figure(weights[head], [_plot_label(ids[p], enc, 12) for p in positions], positions,
                                  title=f"Block {layer}, head {head} · {span}", height=HEATMAP_HEIGHT)
    figures.append(f"<h2>Attention: block {layer}, head {head}</h2>"
                   + _figure_html(heat, "attention", first=True))
    if steps:
        r = steps[-1]
        top = topk_figure([_plot_label(c.token_id, enc, 16) for c in r.candidates[:top_k]],
                                [c.prob for c in r.candidates[:top_k]], [c.token_id for c in r.candidates[:top_k]],
                                chosen=next((k for k, c in enumerate(r.candidates[:top_k])
                                             if c.token_id == r.token_id), -1),
                                title=f"Step {len(steps)}: the model's top {min(top_k, len(r.candidates))} "
                                      "next tokens", height=TOPK_HEIGHT)
        figures.append("<h2>The last step's candidates</h2>" + _figure_html(top, "topk", first=False))
    lensed = [r for r in steps if r.lens]
    if lensed:
        first = max(0, len(steps) - lens_steps)
        parts = []
        for k, a in enumerate(range(first, len(steps), LENS_CHUNK)):
            chunk = [r for r in steps[a:a + LENS_CHUNK] if r.lens]
            if chunk:
                parts.append(_figure_html(_lens_figure(session, chunk, a), "lens" if k == 0 else f"lens-{k}",
                                          first=False))
        figures.append("<h2>Logit lens</h2>" + "".join(parts))
    return figures


def session_report_html(session: GenerationSession, *, layer: int, head: int, title: str | None = None,
                        top_k: int = 5, model_label: str | None = None, lens_steps: int = DEFAULT_LENS_STEPS,
                        attn_window: int | None = None) -> str:
    """One standalone HTML document describing ``session`` (see the module docstring).

    ``layer`` / ``head``: the attention heatmap shown (block and head, 0-based). ``top_k``:
    candidates per step in the table (at most what the session recorded). ``model_label``:
    text naming the model (e.g. the app's "random weights (seed 123), seed-124M, float32").
    ``lens_steps``: the latest steps shown in the logit lens (figures of :data:`LENS_CHUNK` steps). ``attn_window``: tokens of the
    heatmap (default the session's ``attn_window``; larger windows are recomputed).
    Raises ``ValueError`` for a layer, head or top_k out of range.
    """
    cfg = session.model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must be between 0 and {cfg.n_layers - 1}, got {layer}")
    if not 0 <= head < cfg.n_heads:
        raise ValueError(f"head must be between 0 and {cfg.n_heads - 1}, got {head}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if lens_steps < 1:
        raise ValueError(f"lens_steps must be at least 1, got {lens_steps}")
    enc, ids, steps = session.enc, session.ids, session.steps
    title = title or "gptviz session report"
    n_prompt = len(session.prompt_ids)
    from .. import __version__

    # Tokens
    chips = "".join(_chip(t, p, enc, "prompt" if p < n_prompt else "gen") for p, t in enumerate(ids))
    text = (f'<pre class="text"><span class="prompt">{_esc(session.prompt_text)}</span>'
            f'<b class="generated">{_esc(session.generated_text)}</b></pre>')

    figures = _figures(session, layer, head, top_k, lens_steps, attn_window)
    lensed = any(r.lens for r in steps)
    lens_note = "" if lensed or not steps else '<p class="note">The logit lens was off for this session.</p>'

    table = _steps_table(session, top_k) if steps else '<p class="note">No steps yet: only the prompt.</p>'
    label = f"<div>model: {_esc(model_label)}</div>" if model_label else ""
    meta = (f'<div class="meta">{label}<div>{n_prompt} prompt tokens, {len(steps)} generated · '
            f"{_esc(_sampling_text(session))} · configuration "
            f"<code>{_esc(cfg.to_dict())}</code></div><div>made with gptviz {_esc(__version__)}</div></div>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{_esc(title)}</h1>
{meta}
<h2>Tokens</h2>
<div class="chips" id="tokens">{chips}</div>
<p class="meta">grey: prompt, green: generated; · is a space, ↵ a newline, → a tab; the small number is the token id.</p>
{text}
<h2>Steps</h2>
{table}
{"".join(figures)}
{lens_note}
</body></html>
"""


def save_session_report(session: GenerationSession, path: str | os.PathLike[str], **options: Any) -> Path:
    """Write :func:`session_report_html` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(session_report_html(session, **options), encoding="utf-8")
    return path
