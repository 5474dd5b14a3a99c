"""Sharing, through the page-level handlers (no browser): a link opens its exact view (steps run,
block and head shown), an out-of-range block warns and falls back, the browser's saved session
(prompt + generated ids) restores the same tokens, a lesson file round-trips, and the report
is a standalone HTML file with the tokens in it."""

from __future__ import annotations

import html
import json
import re
import shutil
import types
from pathlib import Path
from urllib.parse import parse_qsl

import gradio as gr
import pytest

from gptviz.tokenizer import encode
from gptviz.ui.generate import GenerateView
from gptviz.ui.links import parse_link
from gptviz.ui.model import ModelView
from gptviz.ui.share import MAX_RESTORE_STEPS, Opened, ShareView
from gptviz.ui.tokenizer import TokenizerView

from .conftest import seeded, source_greedy

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]
LINK = {"tab": "generate", "prompt": PROMPT, "steps": "6", "layer": "1", "head": "2"}


def tab(session_hash: str, query: dict[str, str] | None = None):
    """A browser tab's request as the page-load event gets it: its session and the URL's query."""
    return types.SimpleNamespace(session_hash=session_hash, query_params=dict(query or {}))


@pytest.fixture
def share(ctx) -> ShareView:
    return ShareView(ctx, TokenizerView(ctx), GenerateView(ctx), ModelView(ctx))


def opened(share: ShareView, saved, request) -> Opened:
    """Run the page-load generator to its end; its last yield is what the page shows."""
    outs = list(share.open_view(saved, request))
    assert outs and all(isinstance(o, Opened) for o in outs)
    return outs[-1]


def steps_of(share: ShareView, who: str, n: int, layer: int = 0, head: int = 0) -> None:
    for _ in range(n):
        share.generate.step(PROMPT, layer, head, request=tab(who))


def test_a_link_opens_its_view(ctx, share, tiny_cfg):
    out = opened(share, None, tab("a", LINK))
    assert out.step_json["ids"] == source_greedy(seeded(tiny_cfg), HELLO_IDS, 6)
    assert len(out.step_json["ids"]) == 10 and out.step_json["steps"] == 6 and out.step_json["viewing"] == 6
    assert out.heatmap.layout.title.text.startswith("Block 1, head 2 ·")
    assert out.heatmap.layout.title.text.endswith("read by step 6")
    assert out.prompt == PROMPT and out.layer.value == 1 and out.head.value == 2
    assert out.layer.maximum == tiny_cfg.n_layers - 1 and out.head.maximum == tiny_cfg.n_heads - 1
    assert out.tabs.selected == "generate"
    assert out.lens.layout.title.text.endswith("steps 1–6")
    assert out.heatmap_avg.layout.title.text.startswith("Block 1")
    assert len(re.findall(r'class="chip[^"]*" style[^>]*title="position', out.gen_text)) == 10
    assert "random weights" in out.card
    assert ctx.visitor(tab("a")).session.ids == out.step_json["ids"]  # the visitor's own session, ready to Step on


def test_a_link_replaces_what_the_tab_had(ctx, share):
    steps_of(share, "a", 3)
    out = opened(share, None, tab("a", LINK))  # the same tab reopened with a link: the link's steps, not 3 + 6
    assert out.step_json["steps"] == 6


def test_an_out_of_range_block_warns_and_falls_back(share):
    with pytest.warns(UserWarning, match="block 7, head 2; this model has 2 blocks of 4 heads") as warned:
        out = opened(share, None, tab("a", {**LINK, "layer": "7"}))
    assert any("block 0, head 0 is shown" in str(w.message) for w in warned)
    assert out.heatmap.layout.title.text.startswith("Block 0, head 0 ·")
    assert out.layer.value == 0 and out.head.value == 0 and len(out.step_json["ids"]) == 10
    with pytest.warns(UserWarning, match="head 9"):
        out = opened(share, None, tab("b", {**LINK, "head": "9"}))
    assert out.heatmap.layout.title.text.startswith("Block 0, head 0 ·")


def test_a_bad_link_warns_and_opens_the_default_view(share):
    with pytest.warns(UserWarning) as warned:
        outs = list(share.open_view(None, tab("a", {"weights": "../../etc/passwd", "tab": "admin"})))
    messages = " ".join(str(w.message) for w in warned)
    assert "not one this app offers" in messages and "no tab 'admin'" in messages
    assert len(outs) == 1 and all(x == gr.skip() for x in outs[0])  # nothing to change on the page
    assert share.ctx.visitor(tab("a")).spec == share.ctx.default_spec


def test_remember_and_restore_the_same_tokens(ctx, share):
    assert share.remember(0, 0, tab("a")) == gr.skip()  # nothing to remember yet
    steps_of(share, "a", 5)
    saved = share.remember(1, 3, tab("a"))
    s = ctx.visitor(tab("a")).session
    assert saved["prompt"] == PROMPT and saved["generated"] == s.ids[4:] and len(saved["generated"]) == 5
    assert (saved["layer"], saved["head"]) == (1, 3)
    assert json.loads(json.dumps(saved)) == saved  # plain data: it goes to the browser's storage
    ctx.visitors.release("a")  # the tab closed; the same browser opens the page again, without a query
    out = opened(share, saved, tab("a2"))
    assert out.step_json["ids"] == s.ids and out.step_json["steps"] == 5
    assert out.layer.value == 1 and out.head.value == 3 and out.prompt == PROMPT
    assert out.heatmap.layout.title.text.startswith("Block 1, head 3 ·")


def test_a_saved_session_that_no_longer_matches_warns(share):
    steps_of(share, "a", 3)
    saved = share.remember(0, 0, tab("a"))
    saved["generated"] = [saved["generated"][0], 42, 42]  # not what today's model chooses
    with pytest.warns(UserWarning, match="other tokens with today's model"):
        out = opened(share, saved, tab("b"))
    assert out.step_json["steps"] == 3 and out.step_json["ids"][:5] == HELLO_IDS + saved["generated"][:1]


@pytest.mark.parametrize("saved", [None, {}, "junk", {"prompt": 5}, {"generated": [1, 2]}])
def test_nothing_saved_opens_nothing(share, saved):
    outs = list(share.open_view(saved, tab("a")))
    assert len(outs) == 1 and all(x == gr.skip() for x in outs[0])


def test_a_saved_session_is_bounded_and_checked_like_a_link(share):
    view = share._saved_view({"prompt": PROMPT, "generated": list(range(1000)), "weights": "/srv/ckpt"})
    assert view.steps == MAX_RESTORE_STEPS and view.weights is None and view.warnings
    assert view.expected_ids == encode(PROMPT) + list(range(MAX_RESTORE_STEPS))
    view = share._saved_view({"prompt": PROMPT, "generated": [1, "x", None, 2.5, 3]})
    assert view.steps == 2 and view.expected_ids == encode(PROMPT) + [1, 3]


def test_the_copy_link_reopens_the_same_tokens(ctx, share):
    steps_of(share, "a", 4, 1, 2)
    query = share.generate_link(PROMPT, 1, 2, 0, 0, 1, 123, tab("a"))  # the sliders: greedy
    assert query.startswith("?") and "steps=4" in query and "layer=1" in query and "head=2" in query
    assert "temperature" not in query  # greedy links stay short
    params = dict(parse_qsl(query[1:]))
    assert parse_link(params, ctx.settings).warnings == []
    out = opened(share, None, tab("fresh", params))
    assert out.step_json["ids"] == ctx.visitor(tab("a")).session.ids
    assert out.heatmap.layout.title.text.startswith("Block 1, head 2 ·")
    # a prompt edited since the last Step: the link reopens that prompt, before any step
    assert "steps=" not in share.generate_link("Other text", 0, 0, 0, 0, 1, 123, tab("a"))


def test_a_sampled_walk_through_reopens_with_the_same_tokens(ctx, share):
    knobs = (0.9, 40, 0.95, 77)  # temperature, top_k, top_p, seed
    for _ in range(4):
        share.generate.step(PROMPT, 0, 0, *knobs, request=tab("a"))
    ids = list(ctx.visitor(tab("a")).session.ids)
    query = share.generate_link(PROMPT, 0, 0, *knobs, request=tab("a"))
    assert all(f"{k}={v}" in query for k, v in zip(("temperature", "top_k", "top_p", "seed"), knobs))
    out = opened(share, None, tab("fresh", dict(parse_qsl(query[1:]))))
    assert out.step_json["ids"] == ids and out.step_json["last_step"]["sampled"] is True
    assert (out.temperature, out.top_k, out.top_p, out.seed) == knobs  # the sliders show what the steps used
    saved = share.remember(0, 0, tab("a"))  # and a reload of the sampled session
    assert (saved["temperature"], saved["top_k"], saved["top_p"], saved["seed"]) == knobs
    ctx.visitors.release("a")
    assert opened(share, saved, tab("a2")).step_json["ids"] == ids


def test_a_link_with_top_p_zero_warns_instead_of_failing(share):
    with pytest.warns(UserWarning, match="top_p"):
        out = opened(share, None, tab("a", {**LINK, "temperature": "1", "top_p": "0"}))
    assert len(out.step_json["ids"]) == 10


def test_lesson_export_and_open_restore_the_same_tokens(ctx, share, tmp_path):
    with pytest.raises(gr.Error, match="Press Step"):
        share.export_lesson(0, 0, tab("a"))
    steps_of(share, "a", 5)
    ids = list(ctx.visitor(tab("a")).session.ids)
    exported = Path(share.export_lesson(1, 2, tab("a")))
    assert exported.name == "gptviz-lesson.json" and exported.is_file()
    lesson = tmp_path / "my lesson.json"  # a real file, as the browser uploads it
    shutil.copy(exported, lesson)
    outs = list(share.open_lesson(str(lesson), tab("b")))
    out = outs[-1]
    assert isinstance(out, Opened) and out.step_json["ids"] == ids and out.step_json["steps"] == 5
    assert ctx.visitor(tab("b")).session.ids == ids
    assert out.tabs.selected == "generate" and out.prompt == PROMPT
    assert out.layer.value == 1 and out.head.value == 2
    assert out.heatmap.layout.title.text.startswith("Block 1, head 2 ·")
    assert share.generate.step(PROMPT, 0, 0, request=tab("b")).step_json["steps"] == 6  # and Step carries on
    with pytest.raises(gr.Error, match="Choose a lesson file"):
        next(share.open_lesson(None, tab("c")))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(gr.Error, match="cannot be opened"):
        next(share.open_lesson(str(broken), tab("c")))


def test_report_is_a_standalone_html_file_with_the_tokens(ctx, share):
    with pytest.raises(gr.Error, match="Press Step"):
        share.export_report(0, 0, tab("a"))
    steps_of(share, "a", 4)
    s = ctx.visitor(tab("a")).session
    path = Path(share.export_report(1, 2, tab("a")))
    assert path.suffix == ".html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().lower().startswith("<!doctype html")
    assert [int(i) for i in re.findall(r'data-id="(\d+)"', text)][: len(s.ids)] == s.ids  # every token, as a chip
    assert html.escape(s.generated_text, quote=False) in text
    assert "random weights" in text
    with pytest.raises(gr.Error, match="Press Step"):
        share.export_report(0, 0, tab("b"))  # b never stepped: no report (and never a's)
