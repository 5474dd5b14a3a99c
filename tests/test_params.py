"""Parameter arithmetic: the source's figures, SPEC.md's GPT-2 sizes, and the real module counted on meta."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptviz import PRESETS, GPTConfig, GPTModel
from gptviz.params import GROUPS, count_params, format_breakdown, memory_and_compute, nearest_preset, param_breakdown
from gptviz.plots.params import params_figure

pytestmark = pytest.mark.numeric  # .ci/run runs this file again on another CPU code path

SEED = PRESETS["seed-124M"]
TIED = SEED.replace(tie_weights=True)
GPT3 = GPTConfig(vocab_size=50257, context_length=2048, emb_dim=12288, n_heads=96, n_layers=96)

# SPEC.md's table of the released GPT-2 sizes (tied, qkv_bias=True).
GPT2_SIZES = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def meta_model(cfg: GPTConfig) -> GPTModel:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return GPTModel(cfg)


def rows(df, kind):
    return df[df["kind"] == kind]


def one(df, **where) -> dict:
    sel = df
    for col, value in where.items():
        sel = sel[sel[col] == value]
    assert len(sel) == 1, where
    return sel.iloc[0].to_dict()


# --------------------------------------------------------------------------- the source's figures


def test_seed_124m_walkthrough_figures_appear_in_the_table():
    df = param_breakdown(SEED)
    shown = set(format_breakdown(df).drop(columns=["% of model"]).to_numpy().ravel())
    for figure in ("38,597,376", "786,432", "589,824", "590,592", "2,362,368", "2,360,064",
                   "7,085,568", "85,026,816", "1,536", "163,009,536", "4,722,432"):
        assert figure in shown, figure


def test_seed_124m_rows():
    df = param_breakdown(SEED)
    assert one(df, module="tok_emb")["total"] == 38_597_376
    assert one(df, module="pos_emb")["total"] == 786_432
    for name in ("W_query", "W_key", "W_value"):
        r = one(df, module=f"trf_blocks.*.att.{name}")
        assert (r["params_each"], r["count"], r["formula"]) == (589_824, 12, "768 * 768")
    assert one(df, module="trf_blocks.*.att.out_proj")["params_each"] == 590_592
    ff1 = one(df, module="trf_blocks.*.ff.layers.0")
    assert (ff1["params_each"], ff1["formula"]) == (2_362_368, "768 * 3072 + 3072")
    assert one(df, module="trf_blocks.*.ff.layers.2")["params_each"] == 2_360_064
    block = one(df, kind="block")
    assert (block["params_each"], block["count"], block["total"]) == (7_085_568, 12, 85_026_816)
    assert one(df, kind="subtotal", group="attention")["params_each"] == 2_360_064
    assert one(df, kind="subtotal", group="feed-forward")["params_each"] == 4_722_432
    assert one(df, module="final_norm")["total"] == 1_536
    assert one(df, kind="component", module="out_head")["total"] == 38_597_376
    assert one(df, kind="total")["total"] == count_params(SEED) == 163_009_536


def test_tied_head_adds_nothing():
    df = param_breakdown(TIED)
    head = one(df, kind="component", module="out_head")
    assert head["total"] == 0 and "tok_emb" in head["note"]
    assert one(df, kind="subtotal", group="output head")["total"] == 0
    assert one(df, kind="total")["total"] == count_params(TIED) == 124_412_160


@pytest.mark.parametrize("name", sorted(GPT2_SIZES))
def test_gpt2_presets_match_spec(name):
    assert count_params(PRESETS[name]) == GPT2_SIZES[name]
    assert one(param_breakdown(PRESETS[name]), kind="total")["total"] == GPT2_SIZES[name]


def test_source_dict_is_accepted():
    assert count_params(SEED.to_dict()) == 163_009_536


# --------------------------------------------------------------------------- against the real module


configs = st.builds(
    lambda heads, head_dim, layers, vocab, ctx, bias, tie: GPTConfig(
        vocab_size=vocab, context_length=ctx, emb_dim=heads * head_dim, n_heads=heads, n_layers=layers,
        qkv_bias=bias, tie_weights=tie,
    ),
    heads=st.sampled_from([1, 2, 3, 4, 12, 25, 96]),
    head_dim=st.sampled_from([1, 2, 7, 64, 128]),
    layers=st.integers(1, 96),
    vocab=st.integers(1, 100_000),
    ctx=st.integers(1, 256),
    bias=st.booleans(),
    tie=st.booleans(),
)


@settings(max_examples=25, deadline=None)
@given(cfg=configs)
def test_count_params_equals_the_module_on_meta(cfg):
    model = meta_model(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


@settings(max_examples=25, deadline=None)
@given(cfg=configs)
def test_breakdown_is_consistent(cfg):
    df = param_breakdown(cfg)
    total = one(df, kind="total")["total"]
    assert total == count_params(cfg)
    assert rows(df, "component")["total"].sum() == total
    assert list(rows(df, "subtotal")["group"]) == list(GROUPS)
    assert rows(df, "subtotal")["total"].sum() == total
    for group in GROUPS:  # each subtotal is the sum of its components
        assert rows(df, "subtotal").set_index("group").loc[group, "total"] == \
            rows(df, "component").query("group == @group")["total"].sum()
    assert abs(rows(df, "component")["percent"].sum() - 100) < 1e-9
    counted = df[df["count"].notna()]
    assert (counted["params_each"] * counted["count"] == counted["total"]).all()


def test_module_names_address_the_real_parameters():
    """Every component row's ``module`` (``*`` = block index) owns exactly ``total`` parameters."""
    for cfg in (SEED, TIED, PRESETS["gpt2"]):
        named = dict(meta_model(cfg).named_parameters())  # a tied out_head.weight is listed once, as tok_emb
        for r in rows(param_breakdown(cfg), "component").itertuples():
            pattern = re.compile(re.escape(r.module).replace(r"\*", r"\d+") + r"\.")
            owned = [p for name, p in named.items() if pattern.match(name)]
            assert sum(p.numel() for p in owned) == r.total, r.module
            if r.total:  # shapes as the state_dict holds them, in the first block
                first = [p for name, p in named.items() if name.startswith(r.module.replace("*", "0") + ".")]
                assert " + ".join(str(tuple(p.shape)) for p in first) == r.shape, r.module


def test_gpt3_sized_config_is_computed():
    df = param_breakdown(GPT3)
    assert one(df, kind="total")["total"] == count_params(GPT3)
    # 96 blocks of 12·d² weights + 10·d biases and norms (no q/k/v bias), plus embeddings,
    # final norm and an untied head
    d, v, t = 12288, 50257, 2048
    assert count_params(GPT3) == 96 * (12 * d * d + 10 * d) + 2 * v * d + t * d + 2 * d


# --------------------------------------------------------------------------- display, memory, presets


def test_format_breakdown_uses_thousands_separators_and_keeps_the_source():
    df = param_breakdown(SEED)
    shown = format_breakdown(df)
    assert shown.iloc[0]["total"] == "38,597,376"
    assert shown["% of model"].iloc[-1] == "100.00 %"
    assert df["total"].dtype.kind == "i" and df["percent"].dtype.kind == "f"  # the source stays numeric


def test_memory_and_compute_follows_the_count():
    for cfg in (SEED, TIED, GPT3):
        n = count_params(cfg)
        m = memory_and_compute(cfg)["value"]
        assert (m["weights_fp32"], m["weights_bf16"], m["weights_int8"]) == (4 * n, 2 * n, n)
        assert m["train_adamw_fp32"] == 16 * n
        assert m["kv_token_fp32"] == 2 * cfg.n_layers * cfg.emb_dim * 4
        assert m["kv_token_bf16"] * 2 == m["kv_token_fp32"]
        assert m["kv_context_fp32"] == m["kv_token_fp32"] * cfg.context_length
        assert m["kv_context_bf16"] == m["kv_token_bf16"] * cfg.context_length


def test_flops_per_token_gpt2():
    # Kaplan et al.: 2·N_non-embedding + 2·n_layers·n_ctx·d; gpt2 has 12 blocks of
    # 12·768² + 13·768 parameters plus a final norm of 2·768 outside the embeddings.
    m = memory_and_compute(PRESETS["gpt2"])
    non_emb = 12 * (12 * 768**2 + 13 * 768) + 2 * 768
    assert m.loc["flops_token", "value"] == 2 * non_emb + 2 * 12 * 1024 * 768
    assert m.loc["flops_token_with_head", "value"] - m.loc["flops_token", "value"] == 2 * 768 * 50257
    assert m.loc["weights_fp32", "readable"] == "497.8 MB"  # SPEC.md: "498 MB of fp32 weights"


def test_nearest_preset():
    assert nearest_preset(SEED) == ("gpt2", 124_439_808, 163_009_536 / 124_439_808)
    for name, size in GPT2_SIZES.items():
        assert nearest_preset(PRESETS[name]).name == name
    assert nearest_preset(GPT3).name == "gpt2-xl" and nearest_preset(GPT3).ratio > 100
    assert nearest_preset(GPTConfig(emb_dim=64, n_heads=4, n_layers=1)).name == "gpt2"


def test_absurd_configuration_is_refused_with_a_message():
    cfg = GPTConfig(emb_dim=10**9, n_heads=1, n_layers=10**4)
    with pytest.raises(ValueError, match="too large"):
        param_breakdown(cfg)
    with pytest.raises(ValueError, match="too large"):
        memory_and_compute(cfg)


# --------------------------------------------------------------------------- figure


def _treemap(cfg):
    fig = params_figure(cfg)
    (trace,) = fig.data
    nodes = dict(zip(trace.ids, trace.values))
    return fig, trace, nodes


@pytest.mark.parametrize("cfg", [SEED, TIED, GPT3])
def test_params_figure_values_sum_consistently(cfg):
    fig, trace, nodes = _treemap(cfg)
    assert trace.type == "treemap" and fig.layout.height == 600
    assert nodes["model"] == count_params(cfg)
    children = {}
    for node, parent in zip(trace.ids, trace.parents):
        children.setdefault(parent, []).append(node)
    for parent, kids in children.items():  # branchvalues="total": a parent is the sum of its children
        if parent:
            assert nodes[parent] == sum(nodes[k] for k in kids), parent
    leaves = [i for i in trace.ids if i not in children]
    assert sum(nodes[i] for i in leaves) == count_params(cfg)


def test_params_figure_shows_tying():
    _, untied, nodes = _treemap(SEED)
    assert nodes["output head"] == 38_597_376
    _, tied, tied_nodes = _treemap(TIED)
    assert "output head" not in tied_nodes  # no tile of its own ...
    tok = list(tied.ids).index("embeddings/token embedding")
    assert "tied" in tied.labels[tok]  # ... the token embedding's tile says it is shared
    assert "tied" in params_figure(TIED).layout.title.subtitle.text
