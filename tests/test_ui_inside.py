"""The Inside view's handlers, called directly: shapes beside the code, head ablation, float32
against bfloat16 and float16, and the visitor's KV cache."""

from __future__ import annotations

import html
import re
import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

import gptviz.model
from gptviz import GPTConfig, GPTModel
from gptviz.settings import RANDOM, Settings
from gptviz.ui.generate import GenerateView
from gptviz.ui.html import code_html
from gptviz.ui.inside import Ablation, Cache, InsideView, Precision, Shapes
from gptviz.ui.serving import ModelSpec, ModelStore, build_model

from .conftest import seeded, source_greedy, visit

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]
TOP_K = Settings().top_k
MODEL_LINES = Path(gptviz.model.__file__).read_text().splitlines()


@pytest.fixture
def view(ctx) -> InsideView:
    return InsideView(ctx)


@pytest.fixture
def gen(ctx) -> GenerateView:
    return GenerateView(ctx)


@pytest.fixture
def a():
    return visit("a")


def result(out):
    """A handler's outputs: its return value, or the last item it streams (a handler that runs in
    slices streams "nothing to redraw" between them, then its outputs)."""
    if isinstance(out, types.GeneratorType):
        items = list(out)
        assert items and all(x == gr.skip() for item in items[:-1] for x in item)  # only the last one draws
        return items[-1]
    return out


def highlighted(code: str) -> tuple[int, str]:
    """(line number, text) of the highlighted line of a code view."""
    (number, text), = re.findall(r'<div class="row hl"><span class="ln">(\d+)</span>(.*?)</div>', code)
    return int(number), html.unescape(text)


def next_logits(model: GPTModel, ids: list[int], head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The next token's logits computed as the app computes them (last position only), so the
    numbers are the same kernel's and compare exactly."""
    with torch.no_grad():
        return model(torch.tensor([ids]), head_mask=head_mask, last_only=True)[0, -1]


def topk_ids(logits: torch.Tensor, k: int = TOP_K) -> list[int]:
    return torch.softmax(logits.float(), -1).topk(k).indices.tolist()


def ids_in(column) -> list[int]:
    """Token ids from display cells such as "·am (716)"."""
    return [int(re.search(r"\((\d+)\)$", cell)[1]) for cell in column]


def test_shapes_trace_the_tokens_the_next_step_reads(view, gen, a, tiny_cfg):
    out = view.shapes(PROMPT, False, request=a)  # no session yet: the prompt
    assert isinstance(out, Shapes)
    assert "the 4 tokens the next Step reads" in out.inside_about and "Hello, I am" in out.inside_about
    for _ in gen.step_n(PROMPT, 2, 0, 0, request=a):
        pass
    out = view.shapes(PROMPT, False, request=a)
    about, table, code = out.inside_about, out.shape_table, out.code
    t, h, d = 6, tiny_cfg.n_heads, tiny_cfg.emb_dim // tiny_cfg.n_heads  # 4 prompt + 2 generated tokens
    assert "the 6 tokens the next Step reads (4 prompt + 2 generated tokens)" in about
    rows = dict(zip(table["module"].str.strip(), table["output"]))
    assert rows["GPTModel"] == f"(1, {t}, {tiny_cfg.vocab_size})" and rows["tok_emb"] == f"(1, {t}, {tiny_cfg.emb_dim})"
    assert rows["attn_scores (tensor)"] == f"(1, {h}, {t}, {t})" and rows["queries (tensor)"] == f"(1, {h}, {t}, {d})"
    assert rows["0 (Linear)"] == f"(1, {t}, {4 * tiny_cfg.emb_dim})"  # ff.layers.0, named by the tree
    assert table["module"].iloc[1].startswith("\u00a0\u00a0") and not table["module"].iloc[0].startswith("\u00a0")
    assert "trf_blocks.1" in " ".join(table["module"])  # the later block, collapsed into one row
    for line, module in zip(table["line"], table["module"]):  # each row's line is real source
        assert 1 <= line <= len(MODEL_LINES), module
    number, text = highlighted(code)  # an attention-scores line of the real source (which one: the next test)
    assert MODEL_LINES[number - 1].strip() == text.strip() and "attn_scores" in text
    assert "MultiHeadAttention.forward" in code
    full = view.shapes(PROMPT, True, request=a).shape_table
    assert len(full) > len(table) and (full["module"].str.strip() == "trf_blocks.1").sum() == 1
    other = view.shapes("Something else", False, request=a).inside_about  # another prompt: that prompt's tokens
    assert "the 2 tokens the next Step reads (2 prompt + 0 generated tokens)" in other


def test_shapes_highlight_where_the_attention_scores_are_made(view, a):
    number, text = highlighted(view.shapes(PROMPT, False, request=a).code)
    assert "attn_scores = queries @ keys" in text and MODEL_LINES[number - 1].strip() == text.strip()


def test_clicking_a_shape_row_highlights_its_line(view, a):
    table = view.shapes(PROMPT, False, request=a).shape_table
    row = table[table["module"].str.strip() == "W_query"].iloc[0].tolist()
    code = InsideView.shape_line(gr.SelectData(None, {"index": [8, 0], "value": row[0], "row_value": row}))
    number, text = highlighted(code)
    assert number == row[-1] and "self.W_query(x)" in text
    bad = gr.SelectData(None, {"index": [0, 0], "value": "", "row_value": ["", "", "", "NaN"]})
    assert InsideView.shape_line(bad) == gr.skip()
    assert highlighted(code_html(10**6))[0] == len(MODEL_LINES)  # clamped to the file
    assert "<" not in re.sub(r"</?(div|span|b)\b[^>]*>", "", code_html(highlighted(code)[0]))  # text escaped


def test_ablation_compares_candidates_and_leaves_the_model_alone(ctx, view, gen, a, tiny_cfg):
    gen.step(PROMPT, 0, 0, request=a)
    session = ctx.visitor(a).session
    model, ids = session.model, session.ids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = result(view.ablation(PROMPT, "0.1, L1H*", request=a))
    assert isinstance(out, Ablation)
    summary, table, figure = out.ablate_summary, out.ablate_table, out.ablate_plot
    n = tiny_cfg.n_heads
    assert f"Switched off <b>{1 + n} of {2 * n} heads</b>" in summary and "block 1: all 4 heads" in summary
    assert "block 0: head 1" in summary
    mask = torch.ones(tiny_cfg.n_layers, n)
    mask[0, 1] = 0
    mask[1] = 0
    normal, ablated = next_logits(model, ids), next_logits(model, ids, mask)
    assert ids_in(table["normal"]) == topk_ids(normal) and ids_in(table["ablated"]) == topk_ids(ablated)
    assert f"{(ablated - normal).abs().max().item():.4g}" in summary
    assert ("top-1 changed" in summary) == bool(normal.argmax() != ablated.argmax())
    bars_normal, bars_ablated = figure.data
    assert (bars_normal.name, bars_ablated.name) == ("normal", "ablated")
    np.testing.assert_allclose(bars_normal.x[:3], torch.softmax(normal, -1).topk(3).values.numpy(), rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the shared model is untouched
    assert gen.step(PROMPT, 0, 0, request=a).step_json["ids"] == source_greedy(seeded(tiny_cfg), HELLO_IDS, 2)


@pytest.mark.parametrize("heads, message", [("", "Type the heads"), ("2.0", "layer 2 is out of range"),
                                            ("0.9", "head 9 is out of range"), ("zero.one", "cannot read head"),
                                            ("0.1" * 10_000, "20,000")])
def test_ablation_refuses_bad_head_lists(view, a, heads, message):
    with pytest.raises(gr.Error, match=message):
        result(view.ablation(PROMPT, heads, request=a))
    assert "Switched off <b>1 of" in result(view.ablation(PROMPT, "1.3", request=a)).ablate_summary  # still usable


def test_precision_compares_float32_with_one_shared_copy_per_dtype(ctx, view, a, tiny_cfg):
    ctx.models = ModelStore(lambda spec: build_model(spec, ctx.device))  # a store of this test's own
    out = result(view.precision(PROMPT, request=a))
    assert isinstance(out, Precision)
    summary, table = out.precision_summary, out.precision_table
    spec = ctx.visitor(a).spec
    model = ctx.models.get(spec)
    bf16, fp16 = ctx.models.low_precision(spec, torch.bfloat16), ctx.models.low_precision(spec, torch.float16)
    assert model.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and fp16.dtype == torch.float16
    assert bf16 is not model and fp16 is not model
    normal = next_logits(model, HELLO_IDS)
    assert ids_in(table["float32"]) == topk_ids(normal)
    assert table.columns.tolist() == ["#", "float32", "p float32", "p bfloat16, same token", "p float16, same token",
                                      "bfloat16", "p bfloat16", "float16", "p float16"]
    for low, column in ((bf16, "bfloat16"), (fp16, "float16")):
        low_logits = next_logits(low, HELLO_IDS).float()
        assert ids_in(table[column]) == topk_ids(low_logits), column
        assert f"<b>{(low_logits - normal).abs().max().item():.4g}</b>" in summary, column
    assert "<th>float32</th><th>bfloat16</th><th>float16</th>" in summary
    assert "one forward over 4 tokens" in summary and summary.count(" ms") == 3
    assert f"top-1 · top-{TOP_K} shared with float32" in summary
    result(view.precision(PROMPT, request=visit("b")))
    assert ctx.models.low_precision(spec, torch.bfloat16) is bf16  # one copy per shared model, not per visitor
    assert ctx.models.low_precision(spec, torch.float16) is fp16


def test_precision_refusals(make_ctx, a, tiny_cfg):
    with pytest.raises(gr.Error, match="a bfloat16 and a float16 copy beside the model"):
        result(InsideView(make_ctx(max_model_bytes=10**4)).precision(PROMPT, request=a))
    ctx = make_ctx()
    ctx.visitor(a).spec = ModelSpec(RANDOM, tiny_cfg, "bfloat16")  # as the Model tab switches it
    with pytest.raises(gr.Error, match="runs in bfloat16"):
        result(InsideView(ctx).precision(PROMPT, request=a))


def test_precision_memory_limit_counts_all_three_models(make_ctx, a, tiny_cfg):
    from gptviz.files.weights import estimated_bytes

    need = estimated_bytes(tiny_cfg, torch.float32) + estimated_bytes(tiny_cfg, torch.bfloat16) \
        + estimated_bytes(tiny_cfg, torch.float16)
    result(InsideView(make_ctx(max_model_bytes=need)).precision(PROMPT, request=a))  # exactly enough
    with pytest.raises(gr.Error, match="GPTVIZ_MAX_MODEL_BYTES"):
        result(InsideView(make_ctx(max_model_bytes=need - 1)).precision(PROMPT, request=a))


def test_kv_cache_view_shows_the_sessions_cache(make_ctx, a, tiny_cfg):
    ctx = make_ctx(read_ahead=False)  # this test reads ahead itself, below: no worker racing it
    view, gen = InsideView(ctx), GenerateView(ctx)
    out = view.kv_cache(request=a)
    assert isinstance(out, Cache) and "cache is empty" in out.kv_summary and len(out.kv_table) == 0
    for _ in gen.step_n(PROMPT, 3, 0, 0, request=a):
        pass
    out = view.kv_cache(request=a)
    summary, table, figure = out.kv_summary, out.kv_table, out.kv_plot
    cached, d = 6, tiny_cfg.emb_dim // tiny_cfg.n_heads  # 4 prompt + 2 generated tokens have been read
    assert table["layer"].tolist() == list(range(tiny_cfg.n_layers))
    assert set(table["K shape"]) == set(table["V shape"]) == {f"(1, {tiny_cfg.n_heads}, {cached}, {d})"}
    filled = 2 * tiny_cfg.n_heads * cached * d * 4  # keys and values of one layer, fp32
    assert set(table["filled"]) == {f"{filled / 1e3:,.1f} kB"}
    assert f"<b>{cached} positions cached</b>" in summary and "<b>Step 3</b>" in summary
    assert "ran 1 of 6 positions" in summary  # step 3 read 6 tokens, 5 from the cache
    assert "read ahead" not in summary
    gen.ctx.visitor(a).session.next_distribution()  # the next step's read, as the app's read ahead makes it
    ahead = view.kv_cache(request=a).kv_summary
    assert "<b>7 positions cached</b>" in ahead and "ran 1 of 6 positions" in ahead  # still step 3's work
    assert "The last position cached belongs to the next Step: read ahead while the model was idle" in ahead
    gen.undo(0, 0, request=a)  # the cache still holds step 3's position, but nothing is read ahead now
    assert "read ahead" not in view.kv_cache(request=a).kv_summary
    without, with_cache = figure.data
    assert with_cache.name == "with the KV cache" and all(a <= b for a, b in zip(with_cache.y, without.y))
    assert figure.layout.shapes[0].x0 == 6  # "now" marked at this step's context
    gen.reset(PROMPT, 0, 0, request=a)  # back at the prompt, which stays cached
    summary = view.kv_cache(request=a).kv_summary
    assert "<b>The next Step</b>" in summary and "ran 1 of 4 positions" in summary


def test_kv_cache_view_after_the_context_overflows(make_ctx, a):
    ctx = make_ctx(GPTConfig(context_length=6, emb_dim=16, n_heads=2, n_layers=2))
    with pytest.warns(UserWarning, match="longer than the model's context"):
        for _ in GenerateView(ctx).step_n(PROMPT, 4, 0, 0, request=a):
            pass
    out = InsideView(ctx).kv_cache(request=a)
    summary, table, figure = out.kv_summary, out.kv_table, out.kv_plot
    assert "recomputes all 6 positions" in summary and len(table) == 0 and figure.layout.shapes[0].x0 == 6
