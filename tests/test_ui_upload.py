"""Uploading one's own checkpoint on the Model tab, through the handler (no browser): the book's
``.pth`` loads for that visitor only and is deleted once read, n_heads is asked for when the
width does not tell it, and on a public Space uploads are off unless the operator allows them."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
import torch

from gptviz import GPTConfig, GPTModel
from gptviz.settings import Settings
from gptviz.ui.generate import GenerateView
from gptviz.ui.model import ModelView, Switched
from gptviz.ui.serving import UPLOAD

from .conftest import source_greedy, visit

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]
#: emb_dim 64 is no released GPT-2's width: the number of heads cannot be read from the tensors
#: (drop_rate is left at its default: the tensors do not tell it)
MINE = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2)


def no_progress(*args, **kwargs) -> None:
    """Stands in for gr.Progress outside an event."""


def saved_model(path: Path, cfg: GPTConfig = MINE, seed: int = 7) -> GPTModel:
    """``torch.save(model.state_dict(), path)`` as chapter 5 does; returns the model saved."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    torch.save(model.state_dict(), path)
    return model


def upload(view: ModelView, path: Path, who: str = "a", n_heads=4, dtype: str = "float32") -> Switched:
    return view.upload(str(path), n_heads, dtype, visit(who), progress=no_progress)


def test_an_upload_is_for_that_visitor_only(ctx, tmp_path):
    gen, view = GenerateView(ctx), ModelView(ctx)
    default = gen.step(PROMPT, 0, 0, request=visit("other")).step_json["model"]
    path = tmp_path / "model.pth"
    mine = saved_model(path)
    out = upload(view, path)
    assert isinstance(out, Switched)
    assert not path.exists()  # deleted once read
    v = ctx.visitor(visit("a"))
    assert v.spec.source == UPLOAD and v.own is not None and v.spec.cfg == MINE
    assert "your file model.pth" in out.card and "your upload `model.pth`" in out.card and "`n_heads=4`" in out.card
    assert "(read from the tensors)" in out.card
    assert out.layer.maximum == 1 and out.head.maximum == 3
    assert "Model changed to your file" in out.gen_text and out.step_json == {}

    for _ in range(3):
        data = gen.step(PROMPT, 1, 3, request=visit("a")).step_json
    assert data["model"].startswith("your file model.pth") and data["model"] != default
    assert data["ids"] == source_greedy(mine, HELLO_IDS, 3)  # the uploaded weights, exactly
    assert ctx.visitor(visit("a")).session.model is v.own
    # everyone else keeps the default model
    assert gen.step(PROMPT, 0, 0, request=visit("other")).step_json["model"] == default
    assert gen.step(PROMPT, 0, 0, request=visit("newcomer")).step_json["model"] == default == ctx.default_spec.label
    assert ctx.visitor(visit("other")).session.model is not v.own
    assert v.own not in [ctx.models.get(ctx.default_spec)]  # never put in the shared store


def test_n_heads_is_asked_when_the_width_does_not_tell(ctx, tmp_path):
    view = ModelView(ctx)
    path = tmp_path / "model.pth"
    saved_model(path)
    before = ctx.visitor(visit("a")).spec
    with pytest.raises(gr.Error, match="n_heads") as e:
        upload(view, path, n_heads=None)
    assert "emb_dim 64" in e.value.message
    assert not path.exists()  # deleted even when it could not be loaded
    assert ctx.visitor(visit("a")).spec == before  # the old model stays
    saved_model(path)
    out = upload(view, path, n_heads=4.0)  # gr.Number gives a float
    assert "`n_heads=4`" in out.card and ctx.visitor(visit("a")).spec.cfg.n_heads == 4
    saved_model(path)
    with pytest.raises(gr.Error, match="n_heads must be a whole number"):
        upload(view, path, n_heads="four")


def test_an_upload_in_bfloat16(ctx, tmp_path):
    path = tmp_path / "small.pth"
    saved_model(path)
    out = upload(ModelView(ctx), path, dtype="bfloat16")
    assert "bfloat16" in out.card and ctx.visitor(visit("a")).own.tok_emb.weight.dtype == torch.bfloat16
    assert GenerateView(ctx).step(PROMPT, 0, 0, request=visit("a")).step_json["model"].endswith("bfloat16")


class _Runs:
    """A pickle that would create a file when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_files_that_are_not_checkpoints_are_refused_and_deleted(ctx, tmp_path):
    view = ModelView(ctx)
    before = ctx.visitor(visit("a")).spec
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(gr.Error, match="Could not load junk.pth"):
        upload(view, junk)
    assert not junk.exists()
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"tok_emb.weight": torch.zeros(2, 2), "x": _Runs(marker)}, evil)
    with pytest.raises(gr.Error, match="Could not load evil.pth"):
        upload(view, evil)
    assert not marker.exists() and not evil.exists()  # nothing of it ran; it is gone
    with pytest.raises(gr.Error, match="Choose a .safetensors or .pth file"):
        upload(view, "")
    assert ctx.visitor(visit("a")).spec == before


def test_uploads_held_at_once_are_bounded(make_ctx, tmp_path):
    ctx = make_ctx(max_uploads=1)
    gen, view = GenerateView(ctx), ModelView(ctx)
    for who in ("a", "b"):
        path = tmp_path / f"{who}.pth"
        saved_model(path)
        upload(view, path, who)
    with pytest.raises(gr.Error, match="uploaded model was released"):
        gen.step(PROMPT, 0, 0, request=visit("a"))  # a's upload made room for b's
    assert gen.step(PROMPT, 0, 0, request=visit("b")).step_json["model"].startswith("your file b.pth")


def test_uploads_are_off_on_a_space_unless_allowed(make_ctx, tmp_path):
    ctx = make_ctx(allow_upload=False, on_space=True)
    view = ModelView(ctx)
    reason = view.upload_off_reason
    assert reason is not None and "GPTVIZ_ALLOW_UPLOAD" in reason and "Space" in reason
    path = tmp_path / "model.pth"
    saved_model(path)
    with pytest.raises(gr.Error, match="GPTVIZ_ALLOW_UPLOAD") as e:
        upload(view, path)
    assert e.value.message == reason
    assert ctx.visitor(visit("a")).spec == ctx.default_spec and ctx.visitor(visit("a")).own is None
    assert "GPTVIZ_ALLOW_UPLOAD=0" in ModelView(make_ctx(allow_upload=False)).upload_off_reason
    assert ModelView(make_ctx()).upload_off_reason is None  # on by default locally


@pytest.mark.parametrize("env, allowed", [
    ({}, True), ({"SPACE_ID": "x"}, False), ({"SPACE_ID": "x", "GPTVIZ_ALLOW_UPLOAD": "1"}, True),
    ({"SPACE_ID": "x", "GPTVIZ_ALLOW_UPLOAD": "true"}, True), ({"GPTVIZ_ALLOW_UPLOAD": "0"}, False),
    ({"SPACE_ID": "x", "GPTVIZ_ALLOW_UPLOAD": ""}, False), ({"SPACE_ID": "", "GPTVIZ_ALLOW_UPLOAD": " "}, True),
])
def test_upload_setting_from_the_environment(env, allowed):
    s = Settings.from_env(env)
    assert s.allow_upload is allowed
    assert s.on_space is bool(env.get("SPACE_ID"))
