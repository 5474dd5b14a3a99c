"""The "Why this token?" panel, through its handlers (no browser): the waterfall's total is the
model's real logit difference (recomputed here), another candidate changes the baseline, a past
step explains that step, the lens detail names the deciding block, saliency has one chip per
token read, and before any step the visitor is told to press Step."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest
import torch

from gptviz import GPTModel
from gptviz.tokenizer import label
from gptviz.trace import RESID_MID, RESIDUAL, Trace
from gptviz.ui.generate import GenerateView
from gptviz.ui.why import Lens, Saliency, Why, WhyPanel

from .conftest import visit

PROMPT = "Hello, I am"


@pytest.fixture
def views(ctx):
    generate = GenerateView(ctx)
    return generate, WhyPanel(ctx, generate)


def run_steps(generate: GenerateView, n: int, who: str = "a") -> None:
    for _ in range(n):
        generate.step(PROMPT, 0, 0, request=visit(who))


def logit_diff(model: GPTModel, ids: list[int], target: int, baseline: int) -> float:
    """logit[target] − logit[baseline] at the last position: one plain forward, computed here."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1].double()
    return float(logits[target] - logits[baseline])


def waterfall_total(fig) -> float:
    bars = fig.data[0]
    assert bars.type == "waterfall" and bars.measure[-1] == "total" and bars.y[-1] == "total: logit difference"
    assert sum(bars.x[:-1]) == pytest.approx(bars.x[-1], abs=1e-6)  # the bars add up to the total bar
    return float(bars.x[-1])


def test_waterfall_total_is_the_real_logit_difference(ctx, views):
    generate, why = views
    run_steps(generate, 3)
    s = ctx.visitor(visit("a")).session
    out = why.why(0, None, visit("a"))  # 0: the viewed (newest) step
    assert isinstance(out, Why)
    r = s.steps[-1]
    runner_up = next(c.token_id for c in r.candidates if c.token_id != r.token_id)
    assert out.why_other.value == runner_up  # the default baseline: the runner-up
    real = logit_diff(s.model, s.ids[:r.position], r.token_id, runner_up)
    assert waterfall_total(out.why_plot) == pytest.approx(real, abs=1e-3)
    assert out.why_table["contribution"].sum() == pytest.approx(real, abs=1e-3)
    assert f"**Step 3** chose `{label(r.token_id)}` over `{label(runner_up)}`" in out.why_note
    assert "random weights" in out.why_note  # the default model is random: said so
    assert [c for _, c in out.why_other.choices] == [c.token_id for c in r.candidates if c.token_id != r.token_id]
    assert out.why_csv.endswith("gptviz-why-step-3.csv")


def test_another_candidate_changes_the_baseline(ctx, views):
    generate, why = views
    run_steps(generate, 2)
    s = ctx.visitor(visit("a")).session
    r = s.steps[-1]
    first = why.why(0, None, visit("a"))
    other = r.candidates[4].token_id
    assert other != r.token_id and other != first.why_other.value
    out = why.why(0, other, visit("a"))
    assert out.why_other.value == other and f"over `{label(other)}`" in out.why_note
    real = logit_diff(s.model, s.ids[:r.position], r.token_id, other)
    total = waterfall_total(out.why_plot)
    assert total == pytest.approx(real, abs=1e-3) and total != pytest.approx(waterfall_total(first.why_plot))
    assert label(other, None, 20) in out.why_plot.layout.title.text
    # a token that is not among the step's candidates (or the chosen one itself) falls back to the runner-up
    for bad in (r.token_id, 50256 if 50256 not in [c.token_id for c in r.candidates] else 0, "x", None):
        assert why.why(0, bad, visit("a")).why_other.value == first.why_other.value


def test_a_past_step_explains_that_steps_token(ctx, views):
    generate, why = views
    run_steps(generate, 5)
    s = ctx.visitor(visit("a")).session
    r2 = s.steps[1]
    out = why.why(2, None, visit("a"))
    baseline = out.why_other.value
    assert baseline in [c.token_id for c in r2.candidates if c.token_id != r2.token_id]
    assert f"**Step 2** chose `{label(r2.token_id)}`" in out.why_note
    assert out.why_plot.layout.title.text.startswith(f"Step 2: Why “{label(r2.token_id, None, 20)}”")
    read = s.ids[:r2.position]  # the 5 tokens step 2 read (4 prompt + step 1's token)
    assert len(read) == 5
    assert waterfall_total(out.why_plot) == pytest.approx(logit_diff(s.model, read, r2.token_id, baseline), abs=1e-3)
    assert out.why_csv.endswith("gptviz-why-step-2.csv")


def decided_block(model: GPTModel, ids: list[int]) -> int | None:
    """The first block from which the model's own pick is the lens's top-1 after every sub-block
    through the end (None: not even on the last), computed here from the residual stream."""
    trace = Trace((RESID_MID, RESIDUAL))
    with torch.no_grad():
        final = int(model(torch.tensor([ids]), trace=trace)[0, -1].argmax())
        rows = [r[0, -1] for pair in zip(trace.get(RESID_MID), trace.get(RESIDUAL)) for r in pair]
        top = [int(model.out_head(model.final_norm(r[None]))[0].argmax()) == final for r in rows]
    if not top[-1]:
        return None
    k = len(top) - 1
    while k > 0 and top[k - 1]:
        k -= 1
    return k // 2


def test_lens_detail_names_the_deciding_block(ctx, views, tiny_cfg):
    generate, why = views
    run_steps(generate, 4)
    s = ctx.visitor(visit("a")).session
    for k in (1, 3, 4):
        out = why.lens_detail(k, visit("a"))
        assert isinstance(out, Lens)
        title = out.lens_lines.layout.title.text
        chosen = label(s.steps[k - 1].token_id, None, 20)
        m = re.fullmatch(rf"Step {k}: “{re.escape(chosen)}” (?:decided at block (\d+)|first only at the very end)",
                         title)
        assert m, title
        at = decided_block(s.model, s.ids[:s.steps[k - 1].position])
        assert (int(m.group(1)) if m.group(1) is not None else None) == at
        if at is not None:
            assert 0 <= at < tiny_cfg.n_layers
        assert out.lens_csv.endswith(f"gptviz-lens-step-{k}.csv")


def test_saliency_has_one_chip_per_token_read(ctx, views):
    generate, why = views
    run_steps(generate, 5)
    s = ctx.visitor(visit("a")).session
    for k in (1, 3, 5):
        out = why.saliency(k, visit("a"))
        assert isinstance(out, Saliency)
        read = s.ids[:s.steps[k - 1].position]
        ids = [int(i) for i in re.findall(r'title="position \d+ · id (\d+)', out.saliency_chips)]
        assert ids == read and len(ids) == 3 + k
        assert out.saliency_chips.count("saliency ") == len(read)  # every chip shaded by its score
        assert f"the tokens step {k} read" in out.saliency_chips
        assert out.saliency_plot.layout.title.text.startswith(f"Saliency of the {len(read)} input tokens")


def test_before_any_step_the_panel_says_press_step(ctx, views):
    generate, why = views
    a = visit("a")
    for call in (lambda: why.why(0, None, a), lambda: why.lens_detail(0, a), lambda: why.saliency(0, a)):
        with pytest.raises(gr.Error, match="Press Step first"):
            call()
    generate.step(PROMPT, 0, 0, request=a)
    generate.reset(PROMPT, 0, 0, request=a)  # a session, but back at the prompt: still nothing to explain
    with pytest.raises(gr.Error, match="Press Step first"):
        why.why(0, None, a)
    run_steps(generate, 1)
    assert why.why(99, None, a).why_note.startswith("**Step 1**")  # a step past the end: clamped to the newest


def test_the_panel_works_for_a_longer_window_than_the_context(make_ctx):
    from gptviz import GPTConfig

    ctx = make_ctx(GPTConfig(context_length=8, emb_dim=16, n_heads=2, n_layers=2))
    generate = GenerateView(ctx)
    why = WhyPanel(ctx, generate)
    with pytest.warns(UserWarning, match="longer than the model's context"):
        run_steps(generate, 7)
    s = ctx.visitor(visit("a")).session
    r = s.steps[-1]
    assert r.cropped
    out = why.why(0, None, visit("a"))
    read = s.ids[r.position - 8:r.position]  # the step read only the last 8 tokens
    assert waterfall_total(out.why_plot) == pytest.approx(
        logit_diff(s.model, read, r.token_id, out.why_other.value), abs=1e-3)
    chips = why.saliency(0, visit("a")).saliency_chips
    assert [int(i) for i in re.findall(r'title="position \d+ · id (\d+)', chips)] == read


# --------------------------------------------------------------------------- the step selector


def recomputed_attention(model: GPTModel, ids: list[int], layer: int) -> np.ndarray:
    """``(n_heads, T, T)`` attention of ``layer`` over ``ids``: one plain traced forward, here."""
    trace = Trace(("attn_weights",), layers=[layer])
    with torch.no_grad():
        model(torch.tensor([ids]), trace=trace)
    return trace.attentions[0][0].double().numpy()


def test_choosing_a_past_step_redraws_every_view_for_it(ctx, views):
    generate, _ = views
    a = visit("a")
    run_steps(generate, 5)
    s = ctx.visitor(a).session
    newest = generate.view(5, 1, 2, a)
    for k in (1, 2, 4):
        out = generate.view(k, 1, 2, a)
        assert out.step_json["viewing"] == k and out.step_json["steps"] == 5
        assert out.step_json["last_step"]["token_id"] == s.steps[k - 1].token_id  # that step's data
        assert out.topk.layout.title.text.startswith(f"Step {k}:")
        assert out.heatmap.layout.title.text.startswith("Block 1, head 2 ")
        assert out.heatmap.layout.title.text.endswith(f"read by step {k}")
        assert f"tokens 0–{2 + k}," in out.heatmap.layout.title.text  # step k read 4 + k - 1 tokens
        assert out.kv.startswith(f"**Step {k}** read {3 + k} tokens")
        assert f"viewing step {k} of 5" in out.gen_text
        assert out.view_step == gr.skip()  # the selector stays where the visitor put it
        r = s.steps[k - 1]
        assert [c.prob for c in r.candidates] == pytest.approx(list(out.topk.data[0].x))
        details = generate.details(1, k, a)
        assert details.lens.layout.title.text.endswith(f"steps 1–{k}")
        assert len(details.lens.data[0].z[0]) == k  # one column per step 1 … k
        assert details.heatmap_avg.layout.title.text.endswith(f"read by step {k}")
        heads = generate.attention(0, 3, a, k)  # the block / head sliders keep the viewed step
        assert heads.heatmap.layout.title.text.startswith("Block 0, head 3 ")
        assert heads.heatmap.layout.title.text.endswith(f"read by step {k}")
    assert newest.heatmap.layout.title.text.endswith("read by step 5") and newest.step_json["viewing"] == 5
    assert len(s.steps) == 5 and s.ids == newest.step_json["ids"]  # viewing changed nothing
    prompt = generate.view(0, 0, 0, a)  # 0: the prompt
    assert prompt.step_json["viewing"] == 0 and "last_step" not in prompt.step_json
    assert prompt.heatmap.layout.title.text.endswith("the prompt")
    assert generate.view(99, 0, 0, a).step_json["viewing"] == 5  # past the end: the newest


def test_a_past_steps_heatmap_is_its_attention_recomputed(ctx, views):
    generate, _ = views
    a = visit("a")
    run_steps(generate, 5)
    s = ctx.visitor(a).session
    for k, layer, head in ((2, 1, 2), (3, 0, 1), (5, 1, 3)):
        read = s.ids[:s.steps[k - 1].position]
        expected = recomputed_attention(s.model, read, layer)  # (heads, T, T)
        shown = generate._attention(s, layer, k)  # what the heatmap is drawn from
        assert shown.positions == list(range(len(read)))
        np.testing.assert_allclose(shown.weights.double().numpy(), expected, atol=1e-6, rtol=0)
        z = np.array(generate.view(k, layer, head, a).heatmap.data[0].z, dtype=float)
        assert z.shape == (len(read), len(read)) and np.isnan(z[np.triu_indices(len(read), 1)]).all()
        # the figure carries the weights rounded to 4 decimals (a smaller page): equal to that
        np.testing.assert_allclose(np.nan_to_num(z), np.tril(expected[head]), atol=5e-5 + 1e-6, rtol=0)
