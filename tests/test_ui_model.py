"""The Model view's handlers, called directly: switching one visitor's model (random weights of
any configuration, released weights by name), the memory limit, the card, the start-up model."""

from __future__ import annotations

import gradio as gr
import pytest

from gptviz import PRESETS, GPTConfig
from gptviz.files.weights import WeightsError
from gptviz.settings import RANDOM, Settings
from gptviz.ui.generate import GenerateView
from gptviz.ui.model import ModelView, Switched
from gptviz.ui.serving import AppContext, ModelSpec, ModelStore, build_model

from .conftest import seeded, source_greedy, visit

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]
SMALL = GPTConfig(emb_dim=8, n_heads=2, n_layers=1)


def test_build_custom_switches_only_this_visitor(ctx):
    gen, view = GenerateView(ctx), ModelView(ctx)
    gen.step(PROMPT, 0, 0, request=visit("other"))
    gen.step(PROMPT, 0, 0, request=visit("a"))
    out = view.build_custom(50257, 32, 48, 3, 3, 0.0, True, True, "float32", request=visit("a"))
    assert isinstance(out, Switched)
    v = ctx.visitor(visit("a"))
    assert v.spec.cfg == GPTConfig(context_length=32, emb_dim=48, n_heads=3, n_layers=3, drop_rate=0.0,
                                   qkv_bias=True, tie_weights=True)
    assert v.session is None  # the old model's session is gone
    assert out.layer.maximum == 2 and out.head.maximum == 2 and "custom configuration" in out.card
    assert "| status | loaded |" in out.card and "| device | cpu |" in out.card and "`n_heads=3`" in out.card
    assert "Model changed to" in out.gen_text and out.step_json == {} and out.kv == ""  # the Generate view reset
    for figure in (out.topk, out.heatmap, out.heatmap_avg, out.grid, out.lens):  # every figure blanked, saying why
        assert figure.data == () and figure.layout.annotations[0].text.startswith("Model changed to")
    data = gen.step(PROMPT, 2, 2, request=visit("a")).step_json
    assert data["steps"] == 1 and len(v.session.model.trf_blocks) == 3
    assert data["ids"] == source_greedy(seeded(v.spec.cfg), HELLO_IDS, 1)
    assert len(ctx.visitor(visit("other")).session.model.trf_blocks) == 2  # the other visitor keeps its model
    view.build_custom(50257, 32, 48, 3, 3, 0.0, True, True, "float32", request=visit("b"))
    gen.step(PROMPT, 0, 0, request=visit("b"))
    assert ctx.visitor(visit("b")).session.model is v.session.model  # the same configuration: one shared model


@pytest.mark.parametrize(
    "fields, message",
    [((50257, 32, 48, 5, 3, 0.0, True, True), "n_heads"), ((1000, 32, 48, 3, 3, 0.0, True, True), "vocab_size")],
)
def test_build_custom_refuses_bad_configs(ctx, fields, message):
    spec = ctx.visitor(visit("a")).spec
    with pytest.raises(gr.Error, match=message):
        ModelView(ctx).build_custom(*fields, "float32", request=visit("a"))
    assert ctx.visitor(visit("a")).spec == spec


def test_memory_limit(make_ctx):
    with pytest.raises(gr.Error, match="gpt2-xl, float32 needs 6.2"):
        ModelView(make_ctx()).load_weights("gpt2-xl", "float32", request=visit("a"))  # refused before any download
    small = make_ctx(max_model_bytes=10**6)
    with pytest.raises(gr.Error, match="allows 0.00 GB"):
        ModelView(small).build_custom(50257, 1024, 768, 12, 12, 0.1, False, False, "bfloat16", request=visit("a"))
    assert small.visitor(visit("a")).spec == small.default_spec


def test_load_weights_failures_keep_the_previous_model(ctx):
    def offline(spec):
        if spec.source != RANDOM:
            raise WeightsError("cannot reach the Hugging Face Hub (offline)")
        return build_model(spec, ctx.device)

    ctx.models = ModelStore(offline)
    view = ModelView(ctx)
    spec = ctx.visitor(visit("a")).spec
    with pytest.raises(gr.Error, match="offline"):
        view.load_weights("gpt2", "bfloat16", request=visit("a"))
    with pytest.raises(gr.Error, match="Unknown weights"):
        view.load_weights("../../etc/passwd", "float32", request=visit("a"))
    with pytest.raises(gr.Error, match="Unknown dtype"):
        view.load_weights("gpt2", "float8", request=visit("a"))
    assert ctx.visitor(visit("a")).spec == spec
    assert GenerateView(ctx).step(PROMPT, 0, 0, request=visit("a")).step_json["steps"] == 1


def test_load_random_weights(ctx):
    ctx.models = ModelStore(lambda spec: seeded(SMALL))  # stands in for the 124M model
    out = ModelView(ctx).load_weights(RANDOM, "bfloat16", request=visit("a"))
    assert ctx.visitor(visit("a")).spec == ModelSpec(RANDOM, PRESETS["seed-124M"], "bfloat16")
    assert "seed 123" in out.card and "bfloat16" in out.card
    assert ctx.visitor(visit("b")).spec == ctx.default_spec  # only this visitor switched


def test_default_model_is_the_seeded_source_config():
    assert ModelSpec.default(Settings()) == ModelSpec(RANDOM, PRESETS["seed-124M"], "float32")
    assert ModelSpec.default(Settings.from_env({})) == ModelSpec(RANDOM, PRESETS["seed-124M"], "float32")
    gpt2 = Settings.from_env({"GPTVIZ_WEIGHTS": "gpt2", "GPTVIZ_DEVICE": "cpu"})
    assert ModelSpec.default(gpt2) == ModelSpec("gpt2")
    assert AppContext(gpt2).visitor(visit("a")).spec == ModelSpec("gpt2")
    assert ModelSpec.default(Settings(weights="gpt2", dtype="bfloat16")) == ModelSpec("gpt2", None, "bfloat16")
    operator = AppContext(Settings(weights="/srv/secret/ckpt", device="cpu"))  # an operator's path
    card = ModelView(operator).model_card(request=visit("a"))
    assert "/srv/secret" not in card and "operator" in card


def test_card_of_a_model_not_built_yet():
    ctx = AppContext(Settings(device="cpu"))  # its own store: nothing built
    card = ModelView(ctx).model_card(request=visit("a"))
    assert "| status | loads on the first Step |" in card and "| parameters | 163,009,536 |" in card
    assert "`torch.manual_seed(123)`" in card and "| device | cpu |" in card
    assert ctx.default_spec not in ctx.models  # the card builds nothing
