"""The app's event handlers, called directly (no browser): every endpoint and its bad inputs."""

from __future__ import annotations

import html
import re
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

import gptviz.model
from gptviz import PRESETS, GPTConfig, GPTModel, encode, ui
from gptviz.weights import WeightsError

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]  # what GPT-2's tokenizer gives


def source_greedy(model: GPTModel, ids: list[int], n: int) -> list[int]:
    """The source's generate_text_simple, uncached, as the reference."""
    idx = torch.tensor([ids])
    ctx = model.cfg.context_length
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -ctx:])[:, -1, :]
            idx = torch.cat([idx, torch.argmax(torch.softmax(logits, -1), -1, keepdim=True)], dim=1)
    return idx[0].tolist()


def seeded(cfg: GPTConfig) -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(cfg).eval()


@pytest.fixture
def visitor(tiny_cfg) -> ui.Visitor:
    return ui.Visitor(ui.ModelSpec(ui.RANDOM, tiny_cfg))


def n_chips(html: str) -> int:
    return len(re.findall(r'class="chip[ "]', html))


def is_skip(x) -> bool:
    return x == gr.skip()


# --------------------------------------------------------------------------- tokenizer


def test_tokenize_hello():
    chips, summary, ids, table = ui.tokenize(PROMPT)
    assert ids == "15496, 11, 314, 716"
    assert n_chips(chips) == 4 and ">15496<" in chips
    assert "4 tokens" in summary and "2.75 characters per token" in summary  # 11 characters / 4 tokens
    assert table["id"].tolist() == HELLO_IDS
    assert table["piece"].tolist() == ["Hello", ",", "·I", "·am"]  # spaces made visible
    assert table["bytes"].tolist()[1] == "2C"


def test_tokenize_shows_endoftext_and_partial_utf8():
    chips, summary, ids, table = ui.tokenize("Hi<|endoftext|>🦜")
    assert "50256" in ids.split(", ")
    assert 'class="chip special"' in chips and "&lt;|endoftext|&gt;" in chips
    assert "1 × `<|endoftext|>`" in summary
    assert 'class="chip partial"' in chips and "&lt;0xF0 0x9F&gt;" in chips  # the parrot's first bytes, honestly
    assert (table["note"] == "partial UTF-8").sum() >= 2


def test_tokenize_makes_whitespace_and_control_characters_visible():
    chips, summary, ids, table = ui.tokenize("a\tb\nc\x00")
    pieces = table["piece"].tolist()
    assert "→" in pieces and "↵" in pieces and "␀" in pieces  # tab, newline, NUL
    assert "\x00" not in chips and "<br>" in chips  # a newline token also breaks the line of chips


def test_tokenize_escapes_html_and_template_syntax():
    chips, *_ = ui.tokenize("<script>alert(1)</script> {{value}} ${value}")
    assert "<script>" not in chips and "{{" not in chips and "${" not in chips
    assert "&lt;" in chips and "&#123;" in chips


def test_tokenize_limits_and_empty_text():
    with pytest.raises(gr.Error, match="20,000"):
        ui.tokenize("a" * (ui.MAX_TEXT_CHARS + 1))
    chips, summary, ids, table = ui.tokenize("")
    assert summary == "0 tokens" and ids == "" and len(table) == 0


def test_tokenize_draws_at_most_max_chips():
    chips, summary, ids, table = ui.tokenize(" a" * 3000)  # 3,000 tokens
    assert n_chips(chips) == ui.MAX_CHIPS and f"{3000 - ui.MAX_CHIPS:,} more tokens" in chips
    assert len(table) == ui.MAX_CHIPS
    assert "3,000 tokens" in summary and len(ids.split(", ")) == 3000


def test_detokenize_round_trip_and_partial_bytes():
    text, chips = ui.detokenize("15496, 11, 314, 716")
    assert text == PROMPT and n_chips(chips) == 4
    text, chips = ui.detokenize("[8582 99]")  # the first two of the parrot's three tokens
    assert text.endswith("\ufffd") and 'class="chip partial"' in chips


@pytest.mark.parametrize(
    "bad, message",
    [("15496, abc", r"Item 2 \('abc'\) is not a whole number"), ("50257", "outside the GPT-2 vocabulary"),
     ("-1", "outside"), ("1.5", "not a whole number"), ("  ,, ", "Type token ids")],
)
def test_detokenize_refuses_bad_ids(bad, message):
    with pytest.raises(gr.Error, match=message):
        ui.detokenize(bad)


# --------------------------------------------------------------------------- generate


def test_steps_follow_the_source_greedy_loop(visitor, tiny_cfg):
    text, topk, heatmap, kv, data, state = ui.step(PROMPT, 0, 0, visitor)
    assert state is visitor and data["ids"][:4] == HELLO_IDS and data["steps"] == 1
    outs = list(ui.step_n(PROMPT, 5, 1, 3, visitor))
    assert len(outs) == 5 and [o[4]["steps"] for o in outs] == [2, 3, 4, 5, 6]  # streamed one by one
    assert visitor.session.ids == source_greedy(seeded(tiny_cfg), HELLO_IDS, 6)
    assert len(re.findall(r'class="chip gen[^"]*" style', outs[-1][0])) == 6 and "gen last" in outs[-1][0]


def test_step_view_shows_this_steps_numbers(visitor):
    ui.step(PROMPT, 0, 0, visitor)
    text, topk, heatmap, kv, data, _ = ui.step(PROMPT, 1, 2, visitor)
    r = visitor.session.steps[-1]
    assert [c.prob for c in r.candidates] == pytest.approx(list(topk.data[0].x))
    assert str(r.candidates[0].token_id) in topk.data[0].y[0]
    assert "computed 1 position instead of 5" in kv  # 4 prompt tokens + 1 generated, 1 new
    assert data["last_step"]["token_id"] == r.token_id == data["ids"][-1]
    weights, positions = visitor.session.attention(1)
    z = np.array(heatmap.data[0].z, dtype=float)
    np.testing.assert_allclose(np.nan_to_num(z), weights[2].numpy(), atol=1e-4)
    assert heatmap.layout.title.text == "Block 1, head 2 · tokens 0–4, read by step 2"
    assert list(heatmap.layout.xaxis.ticktext) == ["Hello", ",", "·I", "·am", ui._label(data["ids"][4], None)]


def test_details_and_attention_endpoints(visitor, tiny_cfg):
    assert all(is_skip(x) for x in ui.details(0, visitor))  # nothing generated yet: nothing to redraw
    for _ in ui.step_n(PROMPT, 3, 0, 0, visitor):
        pass
    avg, grid, lens = ui.details(1, visitor)
    weights, _ = visitor.session.attention(1)
    np.testing.assert_allclose(np.nan_to_num(np.array(avg.data[0].z, dtype=float)), weights.mean(0).numpy(), atol=1e-4)
    assert sum(t.coloraxis == "coloraxis" for t in grid.data) == tiny_cfg.n_heads
    z = np.array(lens.data[0].z, dtype=float)
    assert z.shape == (tiny_cfg.n_layers, 3)
    top_row = [visitor.session.steps[k].token_id for k in range(3)]
    assert [c for c in lens.data[0].customdata[-1]] == [ui._label(i, None, 24) for i in top_row]
    heat, avg2, grid2 = ui.attention(99, -5, visitor)  # out-of-range controls are clamped
    assert "Block 1, head 0" in heat.layout.title.text


def test_undo_reset_and_prompt_change(visitor):
    with pytest.warns(UserWarning, match="Nothing to undo"):
        out = ui.undo(0, 0, visitor)
    assert all(is_skip(x) for x in out[:5])
    first = ui.step(PROMPT, 0, 0, visitor)[4]["ids"]
    ui.step(PROMPT, 0, 0, visitor)
    assert ui.undo(0, 0, visitor)[4]["ids"] == first
    assert ui.step(PROMPT, 0, 0, visitor)[4]["ids"][:-1] == first  # undo then step repeats
    _, _, heatmap, kv, data, _ = ui.reset(PROMPT, 0, 0, visitor)
    assert data["ids"] == HELLO_IDS and data["steps"] == 0
    assert heatmap.layout.title.text.endswith("tokens 0–3, the prompt")
    assert f"{visitor.session.cache_tokens} prompt tokens cached" in kv  # what the readout promises ...
    assert "computed 1 position instead of 4" in ui.step(PROMPT, 0, 0, visitor)[3]  # ... holds
    ui.reset(PROMPT, 0, 0, visitor)
    with pytest.warns(UserWarning, match="Nothing to undo"):
        ui.undo(0, 0, visitor)
    data = ui.step("Once upon a time", 0, 0, visitor)[4]  # a new prompt starts a new session
    assert data["prompt_tokens"] == 4 and data["ids"][:2] == [7454, 2402] and data["steps"] == 1


@pytest.mark.parametrize(
    "prompt, message",
    [("", "prompt is empty"), (None, "prompt is empty"), ("x" * (ui.MAX_TEXT_CHARS + 1), "20,000"),
     ("a b " * 600, "limit is 1,024 tokens")],
)
def test_bad_prompts_are_refused_and_the_session_survives(visitor, prompt, message):
    ui.step(PROMPT, 0, 0, visitor)
    with pytest.raises(gr.Error, match=message):
        ui.step(prompt, 0, 0, visitor)
    assert ui.step(PROMPT, 0, 0, visitor)[4]["steps"] == 2


@pytest.mark.parametrize("n", [0, ui.MAX_STEPS_PER_CLICK + 1, "many", None])
def test_step_n_refuses_bad_counts(visitor, n):
    with pytest.raises(gr.Error, match="Step ×N"):
        next(ui.step_n(PROMPT, n, 0, 0, visitor))


def test_steps_past_the_context_crop_with_one_warning():
    cfg = GPTConfig(context_length=8, emb_dim=16, n_heads=2, n_layers=2)
    v = ui.Visitor(ui.ModelSpec(ui.RANDOM, cfg))
    with pytest.warns(UserWarning, match="longer than the model's context") as warned:
        outs = list(ui.step_n(PROMPT, 8, 0, 0, v))
    assert sum("context" in str(w.message) for w in warned) == 1  # said once, when cropping starts
    assert outs[-1][4]["last_step"]["cropped"] and outs[-1][4]["last_step"]["context_len"] == 8
    assert "recomputes" in outs[-1][3]
    assert "unseen" in outs[-1][0]  # tokens outside the context are dimmed
    assert v.session.ids == source_greedy(seeded(cfg), HELLO_IDS, 8)


def test_session_token_limit(visitor, monkeypatch):
    monkeypatch.setattr(ui, "MAX_SESSION_TOKENS", 6)
    ui.step(PROMPT, 0, 0, visitor)
    ui.step(PROMPT, 0, 0, visitor)
    with pytest.raises(gr.Error, match="limit is 6"):
        ui.step(PROMPT, 0, 0, visitor)
    assert ui.reset(PROMPT, 0, 0, visitor)[4]["steps"] == 0


def test_visitors_do_not_share_sessions(tiny_cfg):
    a, b, alone = (ui.Visitor(ui.ModelSpec(ui.RANDOM, tiny_cfg)) for _ in range(3))
    alone = ui.step(PROMPT, 0, 0, alone)[4]["ids"]
    ui.step(PROMPT, 0, 0, a)
    ui.step("Something else entirely", 0, 0, b)
    ui.step("Something else entirely", 0, 0, b)
    assert a.session.ids == alone and len(b.session.ids) == len(encode("Something else entirely")) + 2
    assert a.session.model is b.session.model  # one shared model, no copies


# --------------------------------------------------------------------------- parameters


SEED_FIELDS = (50257, 1024, 768, 12, 12, 0.1, False, False)


def test_params_for_the_source_config():
    total, preset, table, chart, memory = ui.params(*SEED_FIELDS)
    assert "163,009,536 parameters" in total and preset == "seed-124M"
    assert "38,597,376" in table.to_string() and "85,026,816" in table.to_string()
    assert "163,009,536" in chart.layout.title.text
    assert memory.columns.tolist() == ["quantity", "value", "formula"]
    total, preset, *_ = ui.params(50257, 1024, 768, 12, 12, 0.1, False, True)
    assert "124,412,160 parameters" in total and preset == ui.CUSTOM
    total, *_ = ui.params(50257, 1024, 768, 12, 24, 0.1, False, False)
    assert "248,036,352" in total  # 163,009,536 + 12 more blocks of 7,085,568


def test_params_handles_gpt3_sized_and_ui_number_formats():
    v, t, d, n = 50257, 2048, 12288, 96
    block = 3 * (d * d + d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d  # att, ff, 2 norms
    expected = v * d + t * d + n * block + 2 * d  # tied head: no extra parameters
    total, preset, table, *_ = ui.params(50257.0, t, d, 96, 96.0, 0, True, True)  # number boxes may send floats
    assert f"{expected:,} parameters" in total and preset == ui.CUSTOM


@pytest.mark.parametrize(
    "fields, name",
    [((50257, 1024, 768, 5, 12, 0.1, False, False), "n_heads"), ((50257, 1024, 768, 12, 0, 0.1, False, False),
                                                               "n_layers"),
     ((50257, None, 768, 12, 12, 0.1, False, False), "context_length"),
     ((50257, 1024, 768.5, 12, 12, 0.1, False, False), "emb_dim"),
     ((50257, 1024, 768, 12, 12, 1.5, False, False), "drop_rate")],
)
def test_invalid_params_warn_with_the_field_and_keep_the_last_result(fields, name):
    with pytest.warns(UserWarning, match=name):
        out = ui.params(*fields)
    assert len(out) == 5 and all(is_skip(x) for x in out)


def test_preset_fills_the_fields():
    out = ui.preset("gpt2")
    assert out[:8] == (50257, 1024, 768, 12, 12, 0.1, True, True)
    assert "124,439,808 parameters" in out[8] and out[9] == "gpt2"
    assert all(is_skip(x) for x in ui.preset(ui.CUSTOM))
    with pytest.raises(gr.Error, match="Unknown preset"):
        ui.preset("gpt5")


# --------------------------------------------------------------------------- model


def test_build_custom_switches_only_this_visitor(visitor):
    other = ui.Visitor(visitor.spec)
    ui.step(PROMPT, 0, 0, other)
    out = ui.build_custom(50257, 32, 48, 3, 3, 0.0, True, True, "float32", visitor)
    card, layer, head, *blank, state = out
    assert state.spec.cfg == GPTConfig(context_length=32, emb_dim=48, n_heads=3, n_layers=3, drop_rate=0.0,
                                       qkv_bias=True, tie_weights=True)
    assert layer.maximum == 2 and head.maximum == 2 and "custom configuration" in card
    assert "| status | loaded |" in card and "| device | cpu |" in card and "`n_heads=3`" in card
    data = ui.step(PROMPT, 2, 2, state)[4]
    assert len(visitor.session.model.trf_blocks) == 3
    assert data["ids"] == source_greedy(seeded(state.spec.cfg), HELLO_IDS, 1)
    assert len(other.session.model.trf_blocks) == 2  # the other visitor keeps its model


@pytest.mark.parametrize(
    "fields, message",
    [((50257, 32, 48, 5, 3, 0.0, True, True), "n_heads"), ((1000, 32, 48, 3, 3, 0.0, True, True), "vocab_size")],
)
def test_build_custom_refuses_bad_configs(visitor, fields, message):
    spec = visitor.spec
    with pytest.raises(gr.Error, match=message):
        ui.build_custom(*fields, "float32", visitor)
    assert visitor.spec == spec


def test_memory_limit(visitor, monkeypatch):
    with pytest.raises(gr.Error, match="gpt2-xl, float32 needs 6.2"):
        ui.load_weights("gpt2-xl", "float32", visitor)  # refused before any download
    monkeypatch.setenv("GPTVIZ_MAX_MODEL_BYTES", "1e6")
    with pytest.raises(gr.Error, match="allows 0.00 GB"):
        ui.build_custom(50257, 1024, 768, 12, 12, 0.1, False, False, "bfloat16", visitor)


@pytest.fixture
def fresh_store(monkeypatch):
    monkeypatch.setattr(ui, "MODELS", ui.ModelStore())


def test_load_weights_failures_keep_the_previous_model(visitor, monkeypatch, fresh_store):
    def offline(*args, **kwargs):
        raise WeightsError("cannot reach the Hugging Face Hub (offline)")

    monkeypatch.setattr(ui, "load_pretrained", offline)
    spec = visitor.spec
    with pytest.raises(gr.Error, match="offline"):
        ui.load_weights("gpt2", "bfloat16", visitor)
    with pytest.raises(gr.Error, match="Unknown weights"):
        ui.load_weights("../../etc/passwd", "float32", visitor)
    with pytest.raises(gr.Error, match="Unknown dtype"):
        ui.load_weights("gpt2", "float8", visitor)
    assert visitor.spec == spec
    assert ui.step(PROMPT, 0, 0, visitor)[4]["steps"] == 1


def test_load_random_weights(visitor, monkeypatch, fresh_store):
    monkeypatch.setattr(ui, "build_model", lambda spec: seeded(GPTConfig(emb_dim=8, n_heads=2, n_layers=1)))
    card, *_, state = ui.load_weights(ui.RANDOM, "bfloat16", visitor)
    assert state.spec == ui.ModelSpec(ui.RANDOM, PRESETS["seed-124M"], "bfloat16")
    assert "seed 123" in card and "bfloat16" in card


def test_model_store_builds_each_model_once(monkeypatch, tiny_cfg):
    calls = []

    def build(spec):
        calls.append(spec)
        return seeded(spec.cfg)

    monkeypatch.setattr(ui, "build_model", build)
    store = ui.ModelStore(capacity=2)
    spec = ui.ModelSpec(ui.RANDOM, tiny_cfg)
    got = []
    threads = [threading.Thread(target=lambda: got.append(store.get(spec))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(m is got[0] for m in got) and spec in store
    for n in (1, 3):  # two more specs: the least recently used is dropped
        store.get(ui.ModelSpec(ui.RANDOM, tiny_cfg.replace(n_layers=n)))
    assert spec not in store and len(calls) == 3


def test_default_model_is_the_seeded_source_config(monkeypatch):
    monkeypatch.delenv("GPTVIZ_WEIGHTS", raising=False)
    assert ui.default_spec() == ui.ModelSpec(ui.RANDOM, PRESETS["seed-124M"], "float32")
    monkeypatch.setenv("GPTVIZ_WEIGHTS", "gpt2")
    assert ui.default_spec() == ui.ModelSpec("gpt2")
    assert ui.Visitor().spec == ui.ModelSpec("gpt2")
    monkeypatch.setenv("GPTVIZ_WEIGHTS", "/srv/secret/ckpt")  # an operator's path
    card = ui.model_card(ui.Visitor())
    assert "/srv/secret" not in card and "operator" in card


# --------------------------------------------------------------------------- the page


def test_page_has_the_named_endpoints_and_ids():
    demo = ui.build_demo(preload=False)
    config = demo.get_config_file()
    names = {d.get("api_name") for d in config["dependencies"]}
    assert {"tokenize", "detokenize", "step", "step_n", "undo", "reset", "attention", "params", "preset",
            "load_model", "build_model", "shapes", "kv_cache", "ablate", "precision"} <= names
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"tokenize-input", "tokenize-btn", "token-chips", "step-btn", "stepn-btn", "undo-btn", "reset-btn",
            "heatmap", "topk-plot", "lens-plot", "kv-readout", "params-total", "cfg-n_layers", "tab-tokenizer",
            "tab-generate", "tab-parameters", "tab-model", "weights-choice", "tab-inside", "shape-table", "model-code",
            "ablate-heads", "ablate-btn", "ablate-plot", "precision-btn", "kv-table", "kv-plot", "step-json-acc"} <= ids


# --------------------------------------------------------------------------- inside

MODEL_LINES = Path(gptviz.model.__file__).read_text().splitlines()


def highlighted(code: str) -> tuple[int, str]:
    """(line number, text) of the highlighted line of a code view."""
    (number, text), = re.findall(r'<div class="row hl"><span class="ln">(\d+)</span>(.*?)</div>', code)
    return int(number), html.unescape(text)


def next_logits(model: GPTModel, ids: list[int], head_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), head_mask=head_mask)[0, -1]


def topk_ids(logits: torch.Tensor, k: int = ui.TOP_K) -> list[int]:
    return torch.softmax(logits, -1).topk(k).indices.tolist()


def ids_in(column) -> list[int]:
    """Token ids from display cells such as "·am (716)"."""
    return [int(re.search(r"\((\d+)\)$", cell)[1]) for cell in column]


def test_shapes_trace_the_tokens_the_next_step_reads(visitor, tiny_cfg):
    about, table, code = ui.shapes(PROMPT, False, visitor)  # no session yet: the prompt
    assert "the 4 tokens the next Step reads" in about and "Hello, I am" in about
    for _ in ui.step_n(PROMPT, 2, 0, 0, visitor):
        pass
    about, table, code = ui.shapes(PROMPT, False, visitor)
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
    number, text = highlighted(code)  # by default: where the attention scores are made
    assert "attn_scores = queries @ keys" in text and MODEL_LINES[number - 1].strip() == text.strip()
    assert "MultiHeadAttention.forward" in code
    _, full, _ = ui.shapes(PROMPT, True, visitor)
    assert len(full) > len(table) and (full["module"].str.strip() == "trf_blocks.1").sum() == 1


def test_clicking_a_shape_row_highlights_its_line(visitor):
    _, table, _ = ui.shapes(PROMPT, False, visitor)
    row = table[table["module"].str.strip() == "W_query"].iloc[0].tolist()
    code = ui.shape_line(gr.SelectData(None, {"index": [8, 0], "value": row[0], "row_value": row}))
    number, text = highlighted(code)
    assert number == row[-1] and "self.W_query(x)" in text
    bad = gr.SelectData(None, {"index": [0, 0], "value": "", "row_value": ["", "", "", "NaN"]})
    assert is_skip(ui.shape_line(bad))
    assert highlighted(ui.code_html(10**6))[0] == len(MODEL_LINES)  # clamped to the file
    assert "<" not in re.sub(r"</?(div|span|b)\b[^>]*>", "", ui.code_html(highlighted(code)[0]))  # text escaped


def test_ablation_compares_candidates_and_leaves_the_model_alone(visitor, tiny_cfg):
    ui.step(PROMPT, 0, 0, visitor)
    model, ids = visitor.session.model, visitor.session.ids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary, table, figure = ui.ablation(PROMPT, "0.1, L1H*", visitor)
    n = tiny_cfg.n_heads
    assert f"Switched off <b>{1 + n} of {2 * n} heads</b>" in summary and "block 1: all 4 heads" in summary
    mask = torch.ones(tiny_cfg.n_layers, n)
    mask[0, 1] = 0
    mask[1] = 0
    normal, ablated = next_logits(model, ids), next_logits(model, ids, mask)
    assert ids_in(table["normal"]) == topk_ids(normal) and ids_in(table["ablated"]) == topk_ids(ablated)
    assert f"{(ablated - normal).abs().max().item():.4g}" in summary
    assert ("top-1 changed" in summary) == (normal.argmax() != ablated.argmax())
    bars_normal, bars_ablated = figure.data
    assert (bars_normal.name, bars_ablated.name) == ("normal", "ablated")
    np.testing.assert_allclose(bars_normal.x[:3], torch.softmax(normal, -1).topk(3).values.numpy(), rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the shared model is untouched
    assert ui.step(PROMPT, 0, 0, visitor)[4]["ids"] == source_greedy(seeded(tiny_cfg), HELLO_IDS, 2)


@pytest.mark.parametrize("heads, message", [("", "Type the heads"), ("2.0", "layer 2 is out of range"),
                                            ("0.9", "head 9 is out of range"), ("zero.one", "cannot read head"),
                                            ("0.1" * 10_000, "20,000")])
def test_ablation_refuses_bad_head_lists(visitor, heads, message):
    with pytest.raises(gr.Error, match=message):
        ui.ablation(PROMPT, heads, visitor)
    assert "Switched off <b>1 of" in ui.ablation(PROMPT, "1.3", visitor)[0]  # still usable


def test_precision_compares_float32_with_one_shared_bfloat16_copy(visitor, fresh_store):
    summary, table = ui.precision(PROMPT, visitor)
    model = ui.MODELS.get(visitor.spec)
    low = ui.MODELS.low_precision(visitor.spec)
    assert low.dtype == torch.bfloat16 and model.dtype == torch.float32 and low is not model
    normal = next_logits(model, HELLO_IDS)
    assert ids_in(table["float32"]) == topk_ids(normal)
    with torch.no_grad():
        low_logits = low(torch.tensor([HELLO_IDS]))[0, -1].float()
    assert ids_in(table["bfloat16"]) == topk_ids(low_logits)
    assert f"{(low_logits - normal).abs().max().item():.4g}" in summary
    assert "one forward over 4 tokens" in summary and summary.count(" ms") == 2
    other = ui.Visitor(visitor.spec)
    ui.precision(PROMPT, other)
    assert ui.MODELS.low_precision(other.spec) is low  # one copy per shared model, not per visitor


def test_precision_refusals(visitor, monkeypatch, fresh_store):
    monkeypatch.setenv("GPTVIZ_MAX_MODEL_BYTES", "1e4")
    with pytest.raises(gr.Error, match="bfloat16 copy beside the model"):
        ui.precision(PROMPT, visitor)
    monkeypatch.delenv("GPTVIZ_MAX_MODEL_BYTES")
    low = ui.Visitor(ui.ModelSpec(ui.RANDOM, visitor.spec.cfg, "bfloat16"))
    with pytest.raises(gr.Error, match="runs in bfloat16"):
        ui.precision(PROMPT, low)


def test_low_precision_copies_leave_with_their_model(monkeypatch, tiny_cfg):
    monkeypatch.setattr(ui, "build_model", lambda spec: seeded(spec.cfg))
    store = ui.ModelStore(capacity=1)
    spec = ui.ModelSpec(ui.RANDOM, tiny_cfg)
    low = store.low_precision(spec)
    assert store.low_precision(spec) is low and low.dtype == ui.LOW_DTYPE
    store.get(ui.ModelSpec(ui.RANDOM, tiny_cfg.replace(n_layers=1)))  # evicts spec, and its copy
    assert spec not in store and store.low_precision(spec) is not low


def test_kv_cache_view_shows_the_sessions_cache(visitor, tiny_cfg):
    summary, table, figure = ui.kv_cache(visitor)
    assert "cache is empty" in summary and len(table) == 0
    for _ in ui.step_n(PROMPT, 3, 0, 0, visitor):
        pass
    summary, table, figure = ui.kv_cache(visitor)
    cached, d = 6, tiny_cfg.emb_dim // tiny_cfg.n_heads  # 4 prompt + 2 generated tokens have been read
    assert table["layer"].tolist() == list(range(tiny_cfg.n_layers))
    assert set(table["K shape"]) == set(table["V shape"]) == {f"(1, {tiny_cfg.n_heads}, {cached}, {d})"}
    filled = 2 * tiny_cfg.n_heads * cached * d * 4  # keys and values of one layer, fp32
    assert set(table["filled"]) == {f"{filled / 1e3:,.1f} kB"}
    assert f"<b>{cached} positions cached</b>" in summary and "<b>Step 3</b>" in summary
    assert "ran 1 of 6 positions" in summary  # step 3 read 6 tokens, 5 from the cache
    without, with_cache = figure.data
    assert with_cache.name == "with the KV cache" and all(a <= b for a, b in zip(with_cache.y, without.y))
    assert figure.layout.shapes[0].x0 == 6  # "now" marked at this step's context


def test_kv_cache_view_after_the_context_overflows():
    v = ui.Visitor(ui.ModelSpec(ui.RANDOM, GPTConfig(context_length=6, emb_dim=16, n_heads=2, n_layers=2)))
    with pytest.warns(UserWarning, match="longer than the model's context"):
        for _ in ui.step_n(PROMPT, 4, 0, 0, v):
            pass
    summary, table, figure = ui.kv_cache(v)
    assert "recomputes all 6 positions" in summary and len(table) == 0 and figure.layout.shapes[0].x0 == 6


def test_step_readout_says_what_the_step_chose(visitor):
    kv = ui.step(PROMPT, 0, 0, visitor)[3]
    r = visitor.session.steps[-1]
    assert f"**Step 1** read 4 tokens and chose `{ui._label(r.token_id)}`" in kv
    assert f"ahead of `{ui._label(r.candidates[1].token_id)}`" in kv and "Logit lens:" in kv
