"""The Generate view's handlers, called directly (no browser): Step, Step ×N, Undo, Reset, the
follow-up figures and the attention sliders, with their bad inputs and limits."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest

from gptviz import GPTConfig, encode
from gptviz.settings import Settings
from gptviz.tokenizer import label
from gptviz.ui.generate import Details, GenerateView, Heads, Main

from .conftest import count_forwards, seeded, source_greedy, visit

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]  # what GPT-2's tokenizer gives
LIMITS = Settings(device="cpu")


@pytest.fixture
def view(ctx) -> GenerateView:
    return GenerateView(ctx)


@pytest.fixture
def a():
    return visit("a")


def is_skip(x) -> bool:
    return x == gr.skip()


def test_steps_follow_the_source_greedy_loop(ctx, view, a, tiny_cfg):
    out = view.step(PROMPT, 0, 0, request=a)
    assert isinstance(out, Main) and out.step_json["ids"][:4] == HELLO_IDS and out.step_json["steps"] == 1
    outs = list(view.step_n(PROMPT, 5, 1, 3, request=a))
    assert len(outs) == 5 and [o.step_json["steps"] for o in outs] == [2, 3, 4, 5, 6]  # streamed one by one
    assert ctx.visitor(a).session.ids == source_greedy(seeded(tiny_cfg), HELLO_IDS, 6)
    assert outs[-1].step_json["ids"] == ctx.visitor(a).session.ids
    text = outs[-1].gen_text
    assert len(re.findall(r'class="chip gen[^"]*" style', text)) == 6 and "gen last" in text


def test_after_a_pause_the_next_step_was_read_ahead_and_runs_no_forward(ctx, view, a, tiny_cfg, monkeypatch):
    for k in range(4):  # after Step, Step ×N, Undo and Reset alike
        if k == 0:
            view.step(PROMPT, 0, 0, request=a)
        elif k == 1:
            list(view.step_n(PROMPT, 3, 0, 0, request=a))
        elif k == 2:
            view.undo(0, 0, request=a)
        else:
            view.reset(PROMPT, 0, 0, request=a)
        assert ctx.ahead.idle()  # the visitor pauses: the model is free, the next step is read
        model = ctx.visitor(a).session.model
        calls = count_forwards(monkeypatch, model)
        out = view.step(PROMPT, 0, 0, request=a)
        assert calls[0] == 0  # the step only chose and drew
        monkeypatch.undo()
        n = len(ctx.visitor(a).session.steps)
        assert out.step_json["ids"] == source_greedy(seeded(tiny_cfg), HELLO_IDS, n)  # the tokens of the source


def test_step_view_shows_this_steps_numbers(ctx, view, a):
    view.step(PROMPT, 0, 0, request=a)
    out = view.step(PROMPT, 1, 2, request=a)
    session = ctx.visitor(a).session
    r = session.steps[-1]
    assert [c.prob for c in r.candidates] == pytest.approx(list(out.topk.data[0].x))
    assert str(r.candidates[0].token_id) in out.topk.data[0].y[0]
    assert "computed 1 position instead of 5" in out.kv  # 4 prompt tokens + 1 generated, 1 new
    data = out.step_json
    assert data["last_step"]["token_id"] == r.token_id == data["ids"][-1]
    weights, positions = session.attention(1)
    z = np.array(out.heatmap.data[0].z, dtype=float)
    np.testing.assert_allclose(np.nan_to_num(z), weights[2].numpy(), atol=1e-4)
    assert out.heatmap.layout.title.text == "Block 1, head 2 · tokens 0–4, read by step 2"
    assert list(out.heatmap.layout.xaxis.ticktext) == ["Hello", ",", "·I", "·am", label(data["ids"][4], None)]


def test_step_readout_says_what_the_step_chose(ctx, view, a):
    kv = view.step(PROMPT, 0, 0, request=a).kv
    r = ctx.visitor(a).session.steps[-1]
    assert f"**Step 1** read 4 tokens and chose `{label(r.token_id)}`" in kv
    assert f"ahead of `{label(r.candidates[1].token_id)}`" in kv and "Logit lens:" in kv


def test_details_and_attention_endpoints(ctx, view, a, tiny_cfg):
    out = view.details(0, None, request=a)
    assert isinstance(out, Details) and all(is_skip(x) for x in out)  # nothing generated yet: nothing to redraw
    assert all(is_skip(x) for x in view.attention(0, 0, request=a))
    for _ in view.step_n(PROMPT, 3, 0, 0, request=a):
        pass
    out = view.details(1, None, request=a)
    session = ctx.visitor(a).session
    weights, _ = session.attention(1)
    avg = np.nan_to_num(np.array(out.heatmap_avg.data[0].z, dtype=float))
    np.testing.assert_allclose(avg, weights.mean(0).numpy(), atol=1e-4)
    assert sum(t.coloraxis == "coloraxis" for t in out.grid.data) == tiny_cfg.n_heads
    z = np.array(out.lens.data[0].z, dtype=float)
    assert z.shape == (tiny_cfg.n_layers, 3)
    top_row = [session.steps[k].token_id for k in range(3)]
    assert [c for c in out.lens.data[0].customdata[-1]] == [label(i, None, 24) for i in top_row]
    heads = view.attention(99, -5, request=a)  # out-of-range controls are clamped
    assert isinstance(heads, Heads) and "Block 1, head 0" in heads.heatmap.layout.title.text
    assert "Block 1, average of 4 heads" in heads.heatmap_avg.layout.title.text
    assert "Block 1: all 4 heads" in heads.grid.layout.title.text


def test_undo_reset_and_prompt_change(ctx, view, a):
    with pytest.warns(UserWarning, match="Nothing to undo"):
        out = view.undo(0, 0, request=a)
    assert all(is_skip(x) for x in out)
    first = view.step(PROMPT, 0, 0, request=a).step_json["ids"]
    view.step(PROMPT, 0, 0, request=a)
    assert view.undo(0, 0, request=a).step_json["ids"] == first
    assert view.step(PROMPT, 0, 0, request=a).step_json["ids"][:-1] == first  # undo then step repeats
    out = view.reset(PROMPT, 0, 0, request=a)
    assert out.step_json["ids"] == HELLO_IDS and out.step_json["steps"] == 0
    assert out.heatmap.layout.title.text.endswith("tokens 0–3, the prompt")
    assert f"{ctx.visitor(a).session.cache_tokens} prompt tokens cached" in out.kv  # what the readout promises ...
    assert "computed 1 position instead of 4" in view.step(PROMPT, 0, 0, request=a).kv  # ... holds
    view.reset(PROMPT, 0, 0, request=a)
    with pytest.warns(UserWarning, match="Nothing to undo"):
        view.undo(0, 0, request=a)
    data = view.step("Once upon a time", 0, 0, request=a).step_json  # a new prompt starts a new session
    assert data["prompt_tokens"] == 4 and data["ids"][:2] == [7454, 2402] and data["steps"] == 1


@pytest.mark.parametrize(
    "prompt, message",
    [("", "prompt is empty"), (None, "prompt is empty"), ("x" * (LIMITS.max_text_chars + 1), "20,000"),
     ("a b " * 600, "limit is 1,024 tokens")],
)
def test_bad_prompts_are_refused_and_the_session_survives(view, a, prompt, message):
    view.step(PROMPT, 0, 0, request=a)
    with pytest.raises(gr.Error, match=message):
        view.step(prompt, 0, 0, request=a)
    assert view.step(PROMPT, 0, 0, request=a).step_json["steps"] == 2


@pytest.mark.parametrize("n", [0, LIMITS.max_steps_per_click + 1, "many", None])
def test_step_n_refuses_bad_counts(view, a, n):
    with pytest.raises(gr.Error, match="Step ×N"):
        next(view.step_n(PROMPT, n, 0, 0, request=a))


def test_step_n_takes_up_to_the_settings_limit(make_ctx, a):
    view = GenerateView(make_ctx(max_steps_per_click=3))
    assert len(list(view.step_n(PROMPT, 3, 0, 0, request=a))) == 3
    with pytest.raises(gr.Error, match="1 to 3 steps per click, got 4"):
        next(view.step_n(PROMPT, 4, 0, 0, request=a))


def test_steps_past_the_context_crop_with_one_warning(make_ctx, a):
    cfg = GPTConfig(context_length=8, emb_dim=16, n_heads=2, n_layers=2)
    ctx = make_ctx(cfg)
    view = GenerateView(ctx)
    with pytest.warns(UserWarning, match="longer than the model's context") as warned:
        outs = list(view.step_n(PROMPT, 8, 0, 0, request=a))
    assert sum("context" in str(w.message) for w in warned) == 1  # said once, when cropping starts
    last = outs[-1]
    assert last.step_json["last_step"]["cropped"] and last.step_json["last_step"]["context_len"] == 8
    assert "recomputes" in last.kv
    assert "unseen" in last.gen_text  # tokens outside the context are dimmed
    assert ctx.visitor(a).session.ids == source_greedy(seeded(cfg), HELLO_IDS, 8)


def test_session_token_limit(make_ctx, a):
    view = GenerateView(make_ctx(max_session_tokens=6))
    view.step(PROMPT, 0, 0, request=a)
    view.step(PROMPT, 0, 0, request=a)
    with pytest.raises(gr.Error, match="limit is 6"):
        view.step(PROMPT, 0, 0, request=a)
    assert view.reset(PROMPT, 0, 0, request=a).step_json["steps"] == 0


def test_visitors_do_not_share_sessions(ctx, view):
    alone = view.step(PROMPT, 0, 0, request=visit("alone")).step_json["ids"]
    view.step(PROMPT, 0, 0, request=visit("a"))
    view.step("Something else entirely", 0, 0, request=visit("b"))
    view.step("Something else entirely", 0, 0, request=visit("b"))
    a, b = ctx.visitor(visit("a")), ctx.visitor(visit("b"))
    assert a is not b
    assert a.session.ids == alone and len(b.session.ids) == len(encode("Something else entirely")) + 2
    assert a.session.model is b.session.model  # one shared model, no copies
    assert view.undo(0, 0, request=visit("b")).step_json["steps"] == 1 and a.session.ids == alone  # undo is b's own


def test_a_request_without_a_session_hash_is_one_anonymous_visitor(ctx, view):
    view.step(PROMPT, 0, 0, request=None)
    assert view.step(PROMPT, 0, 0, request=object()).step_json["steps"] == 2  # the same (anonymous) visitor
    assert view.step(PROMPT, 0, 0, request=visit("a")).step_json["steps"] == 1


def test_visitors_resetting_at_once_are_read_in_one_batch_and_see_their_own_prompt(ctx, view):
    """A class opening new prompts together: their prompts are read in one batched forward
    (ctx.steps), and each visitor's view and next Step are what it would get alone."""
    import threading

    prompts = ["Hello, I am", "Once upon a time there was", "The", "def main():"]
    alone = []
    for k, p in enumerate(prompts):
        out = view.reset(p, 1, 2, request=visit(f"alone-{k}"))
        alone.append((out, view.step(p, 1, 2, request=visit(f"alone-{k}"))))
    got, errors = {}, []

    def together(work):
        start = threading.Barrier(len(prompts))

        def run(k):
            try:
                start.wait()
                work(k)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []

    ctx.steps.batches.clear()
    together(lambda k: got.__setitem__(k, view.reset(prompts[k], 1, 2, request=visit(f"class-{k}"))))
    assert max(ctx.steps.batches) > 1  # the new prompts were read together
    together(lambda k: got.__setitem__((k, "step"), view.step(prompts[k], 1, 2, request=visit(f"class-{k}"))))
    for k, (reset, step) in enumerate(alone):
        assert got[k].step_json == reset.step_json
        assert got[k].heatmap.layout.title.text == reset.heatmap.layout.title.text
        np.testing.assert_allclose(np.array(got[k].heatmap.data[0].z, dtype=float),
                                   np.array(reset.heatmap.data[0].z, dtype=float), atol=1e-6)  # float32 weights
        assert got[k, "step"].step_json["ids"] == step.step_json["ids"]
        timeless = [re.sub(r"Step time \d+ ms", "", out.kv) for out in (got[k, "step"], step)]
        assert timeless[0] == timeless[1]  # the same readout: the work the step did (1 position after Reset)
    assert "computed 1 position instead of" in got[0, "step"].kv
