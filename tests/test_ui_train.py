"""The Train view through its handlers (no browser): a visitor trains its own copy, pauses and
resumes, explores the trained model in the Generate view, downloads the book's .pth, checks
autograd; bad input gets a specific message; trainings wait in line; a closed tab stops one."""

from __future__ import annotations

import threading
import time

import gradio as gr
import plotly.io as pio
import pytest
import torch

from gptviz.config import CONFIG_FIELDS, GPTConfig
from gptviz.files.weights import load_pretrained
from gptviz.ui.generate import GenerateView
from gptviz.ui.model import ModelView, Switched
from gptviz.ui.serving import TRAINED, Turns
from gptviz.ui.train import OWN_TEXT, PARAMETERS, VERDICT, Trained, TrainView

from .conftest import visit

#: A configuration that trains in a few seconds (The Verdict: 4,608 training tokens, 18 windows of 32 × 8 batches)
SMALL = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
FIELDS = [getattr(SMALL, f) for f in CONFIG_FIELDS]


def fig(shown):
    """The plotly figure the page gets (figures are serialised in the model's turn)."""
    return pio.from_json(shown.plot.rsplit(', "config"', 1)[0] + "}")


def start(view, who="a", source=VERDICT, text="", file=None, choice=PARAMETERS, epochs=2, lr=0.004, batch=8,
          max_length=32, stride=32, fields=FIELDS):
    return view.start(source, text, file, choice, epochs, lr, batch, max_length, stride, *fields, request=visit(who))


def test_a_visitor_trains_explores_downloads_and_checks_autograd(ctx, tmp_path):
    view, models, gen = TrainView(ctx), ModelView(ctx), GenerateView(ctx)
    shown = list(start(view))
    assert all(isinstance(s, Trained) for s in shown)
    last = shown[-1].train_status
    assert last.startswith("**Done**") and "step 36/36" in last  # 2 epochs of 18 batches
    run = ctx.visitor(visit("a")).training
    losses = run.trainer.train_losses
    assert len(losses) == len(run.trainer.track_tokens_seen) > 2 and losses[-1] < losses[0]
    assert len(run.samples) == 2 and "after epoch 2: Every effort moves you" in shown[-1].train_sample
    figure = fig(shown[-1].train_loss)
    assert list(figure.data[0].y) == pytest.approx(losses, abs=1e-12) and figure.layout.xaxis2.ticktext == ("0", "1", "2")
    assert len(fig(shown[-1].train_grads).data[0].y) == 2  # one bar per block

    before = gen.step("Every effort moves you", 0, 0, request=visit("a")).step_json["model"]
    out = view.trained_model(visit("a"))
    switched = models.use_own(*out)
    assert isinstance(switched, Switched) and "the model you trained" in switched.card
    after = gen.step("Every effort moves you", 0, 0, request=visit("a"))
    assert after.step_json["model"].startswith("the model you trained") and after.step_json["model"] != before
    assert ctx.visitor(visit("a")).spec.source == TRAINED
    assert gen.step("Every effort", 0, 0, request=visit("b")).step_json["model"] == before  # others: unchanged

    path = view.download(visit("a"))
    loaded = load_pretrained(path, n_heads=SMALL.n_heads)  # the book's .pth holds tensors only
    ids = torch.tensor([[464, 3290, 318]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), run.trainer.model.eval()(ids), atol=1e-5, rtol=1e-5)

    table, note = view.autograd(visit("a"))
    assert list(table["agree"]) == ["yes"] * 4 and "2ε" in note


def test_pause_then_start_resumes_where_it_stopped(ctx):
    view = TrainView(ctx)
    items = start(view, epochs=1)
    for _ in range(3):
        next(items)
    view.pause(visit("a"))
    rest = list(items)
    assert rest[-1].train_status.startswith("**Paused**")
    trainer = ctx.visitor(visit("a")).training.trainer
    paused_at = trainer.global_step
    assert 2 <= paused_at < 17
    resumed = list(start(view, epochs=1))
    assert resumed[-1].train_status.startswith("**Done**") and trainer.global_step == 17
    assert ctx.visitor(visit("a")).training.trainer is trainer  # the same run, continued


def test_one_training_per_visitor_and_the_others_wait_in_line(make_ctx):
    ctx = make_ctx(max_trainings=1)
    view = TrainView(ctx)
    first = start(view, "a", epochs=1)
    next(first)
    with pytest.raises(gr.Error, match="training already"):
        next(start(view, "a", epochs=1))
    second = start(view, "b", epochs=1)
    waiting = next(second)
    assert "number 1 in line" in waiting.train_status
    list(first)  # a finishes: b's turn
    assert list(second)[-1].train_status.startswith("**Done**")


def test_a_closed_tab_stops_its_training(ctx):
    view = TrainView(ctx)
    items = start(view, epochs=5)
    next(items)
    trainer = ctx.visitor(visit("a")).training.trainer
    done = threading.Event()

    def rest():
        list(items)
        done.set()

    threading.Thread(target=rest, daemon=True).start()
    time.sleep(0.2)
    ctx.visitors.release("a")
    assert done.wait(30) and not trainer.done and trainer._stop.is_set()


@pytest.mark.parametrize("kwargs, message", [
    (dict(source=OWN_TEXT, text="   "), "training text is empty"),
    (dict(source=OWN_TEXT, text="Hello"), "single token"),
    (dict(source=OWN_TEXT, text="Every effort moves you " * 5), "shorter than one window"),
    (dict(lr="fast"), "learning rate must be a positive number"),
    (dict(lr=-0.1), "learning rate must be a positive number"),
    (dict(lr=0), "learning rate must be a positive number"),
    (dict(epochs=None), "epochs must be a whole number"),
    (dict(epochs=2.5), "epochs must be a whole number"),
    (dict(batch=0), "batch size must be a whole number"),
    (dict(max_length=33), "max_length must be a whole number from 2 to 32"),
    (dict(stride="x"), "stride must be a whole number"),
    (dict(choice="huge"), "Unknown configuration"),
    (dict(fields=[100, *FIELDS[1:]]), "vocab_size must be 50257"),
])
def test_bad_input_gets_a_specific_message(ctx, kwargs, message):
    with pytest.raises(gr.Error, match=message):
        next(start(TrainView(ctx), **kwargs))


def test_bad_files_and_limits_get_specific_messages(make_ctx, tmp_path):
    binary, latin = tmp_path / "model.bin", tmp_path / "latin.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    latin.write_bytes("café au lait ".encode("latin-1") * 100)
    view = TrainView(make_ctx())
    with pytest.raises(gr.Error, match="binary"):
        next(start(view, source=OWN_TEXT, file=str(binary)))
    with pytest.raises(gr.Error, match="not UTF-8"):
        next(start(view, source=OWN_TEXT, file=str(latin)))
    small = TrainView(make_ctx(max_train_text_bytes=1_000))
    with pytest.raises(gr.Error, match="up to 0.0 MB|may be up to"):
        next(start(small, source=OWN_TEXT, text="word " * 1_000))
    tight = TrainView(make_ctx(max_model_bytes=10_000_000))
    with pytest.raises(gr.Error, match=r"needs about .* GB .* AdamW's two moments"):
        next(start(tight, choice="book-ch05", max_length=256, stride=256, batch=2))


def test_an_optimizer_step_takes_several_short_turns(ctx, monkeypatch):
    """A batch of 8 windows of 32 tokens (256 tokens) with SLICE_TOKENS = 64: two rows a turn,
    so at least 4 turns an optimizer step, each at the training's priority."""
    import gptviz.ui.train as train_view

    monkeypatch.setattr(train_view, "SLICE_TOKENS", 64)
    priorities, real = [], ctx.turn.acquire
    monkeypatch.setattr(ctx.turn, "acquire", lambda priority=Turns.STEP: priorities.append(priority) or real(priority))
    shown = list(start(TrainView(ctx), epochs=1))
    steps = ctx.visitor(visit("a")).training.trainer.total_steps
    assert shown[-1].train_status.startswith("**Done**")
    assert priorities.count(Turns.TRAIN) >= 4 * steps and set(priorities) == {Turns.TRAIN}
