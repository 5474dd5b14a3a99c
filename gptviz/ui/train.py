"""The Train view: the book's chapter-5 pretraining, live. A visitor trains a model of their own
(never the shared one) on The Verdict or their own text, watches the loss fall, the sample after
each epoch and the gradient reaching each block, checks backpropagation against finite
differences, then explores the trained model in every other view or downloads it as the book's
``.pth``.

Sharing the Space: an optimizer step is a few short turns on the model at the lowest priority
(:attr:`~gptviz.ui.turns.Turns.TRAIN`): its batch is read :data:`SLICE_TOKENS` tokens at a time
(the gradients add up to the whole batch's, :meth:`~gptviz.train.Trainer.step_in_slices`), then
the update, each evaluation batch and the sample, so other visitors' Steps run between them and
wait at most one slice; at most one
training per visitor and ``GPTVIZ_MAX_TRAININGS`` at once (the others wait, told their place in
line); memory is counted before it starts; a closed tab stops its training.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import torch

from ..config import config_from_fields
from ..files.weights import estimated_bytes
from ..plots.style import empty_figure
from ..plots.train import grad_norm_figure, loss_figure
from ..tokenizer import get_encoding
from ..analysis.autograd import gradient_check
from ..train import TRAIN_PRESETS, Trainer, TrainPreset, TrainStep, read_text, save_checkpoint, setup
from .components import Plot, rendered
from .memory import STATE_FACTOR, drop_own
from .outputs import components
from .serving import TRAINED, AppContext, ModelSpec, Turns, Visitor, error

VERDICT, OWN_TEXT = "verdict", "own"
TEXT_CHOICES = [("The Verdict (the book's chapter-5 text, 5,145 tokens)", VERDICT), ("my own text", OWN_TEXT)]
PARAMETERS = "parameters"  # the configuration of the Parameters tab
CONFIG_CHOICES = [("one-minute: 4 blocks, 128 wide, 32 optimizer steps (1 to 4 minutes on 2 CPU cores)", "one-minute"),
                  ("the book's chapter 5: GPT_CONFIG_124M, context 256 (about 10 minutes)", "book-ch05"),
                  ("the Parameters tab's configuration", PARAMETERS)]
LIMITS = dict(epochs=100, batch_size=64)
#: The weights whose derivative the autograd check compares (name, index): one of each kind.
CHECKED_WEIGHTS = [("tok_emb.weight", (464, 0)), ("trf_blocks.0.att.W_query.weight", (0, 0)),
                   ("trf_blocks.0.ff.layers.0.weight", (1, 2)), ("final_norm.scale", (0,))]
CHECK_TOLERANCE = dict(rel=1e-4, abs=1e-7)  # float64 on both sides: only the central difference's error


class Trained(NamedTuple):
    train_status: str
    train_loss: go.Figure
    train_grads: go.Figure
    train_sample: str


#: Tokens of the batch one turn reads (forward and backward): 2 rows of the one-minute preset's
#: 128, ~0.3 s on the 2-core machine where the whole batch of 8 took ~1.3 s in one turn.
SLICE_TOKENS = 256


@dataclass(eq=False)
class TrainingRun:
    """One visitor's training: the trainer (its own model copy) and what the view shows of it."""

    trainer: Trainer
    preset: TrainPreset
    what: str  # the configuration and text, for the status and the model's name
    tokens_per_epoch: int
    last: TrainStep | None = None
    samples: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    stopped: bool = False  # Stop pressed: kept for Explore and Download, not resumed
    active: bool = False  # a Start is running it (one at a time)


class Line:
    """At most ``size`` trainings at once; the others wait in arrival order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._running: set[int] = set()
        self._waiting: list[int] = []

    def place(self, key: int) -> int:
        """0 once ``key`` may train (it then holds a place until :meth:`leave`), else its place in line."""
        with self._cond:
            if key in self._running:
                return 0
            if key not in self._waiting:
                self._waiting.append(key)
            if len(self._running) < self.size and self._waiting[0] == key:
                self._waiting.pop(0)
                self._running.add(key)
                return 0
            return self._waiting.index(key) + 1

    def leave(self, key: int) -> None:
        with self._cond:
            self._running.discard(key)
            if key in self._waiting:
                self._waiting.remove(key)


def _whole(name: str, value: Any, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a whole number, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise error(f"{name} must be a whole number from {low} to {high:,}, got {value!r}.")
    return int(number)


def _rate(value: Any) -> float:
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise error(f"The learning rate must be a positive number, got {value!r}.") from None
    if not math.isfinite(lr) or lr <= 0 or lr > 1:
        raise error(f"The learning rate must be a positive number up to 1 (the book uses 0.0004), got {value!r}.")
    return lr


class TrainView:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.c: dict[str, Any] = {}
        self.line = Line(ctx.settings.max_trainings)

    # --------------------------------------------------------------- inputs
    def text(self, source: str, text: Any, file: Any) -> tuple[str, str]:
        """(the training text, what it is): The Verdict, or the visitor's own (pasted or a file)."""
        limit = self.ctx.settings.max_train_text_bytes
        if source == VERDICT:
            return read_text(), "The Verdict"
        if source != OWN_TEXT:
            raise error(f"Unknown text {source!r}: choose The Verdict or your own text.")
        if file:
            path = Path(getattr(file, "name", file))
            if path.stat().st_size > limit:
                raise error(f"{path.name} is {path.stat().st_size / 1e6:.1f} MB; training texts may be up to "
                            f"{limit / 1e6:.1f} MB here.")
            data = path.read_bytes()
            if b"\x00" in data:
                raise error(f"{path.name} looks like a binary file, not text: choose a plain UTF-8 .txt file.")
            try:
                return data.decode("utf-8"), f"your file {path.name}"
            except UnicodeDecodeError as e:
                raise error(f"{path.name} is not UTF-8 text (byte {e.start} cannot be read): save it as UTF-8.") from None
        text = text if isinstance(text, str) else ""
        if not text.strip():
            raise error("The training text is empty: paste some text or choose a .txt file (or train on The Verdict).")
        if len(text.encode("utf-8")) > limit:
            raise error(f"The pasted text is {len(text.encode('utf-8')) / 1e6:.1f} MB; training texts may be up to "
                        f"{limit / 1e6:.1f} MB here.")
        return text, "your text"

    def preset(self, choice: str, fields: list[Any], epochs: Any, lr: Any, batch: Any, max_length: Any,
               stride: Any) -> TrainPreset:
        """The run's configuration and hyperparameters, every field checked."""
        if choice == PARAMETERS:
            try:
                cfg = config_from_fields(*fields)
            except ValueError as e:
                raise error(f"Invalid configuration on the Parameters tab: {e}.") from None
            if cfg.vocab_size != get_encoding().n_vocab:
                raise error(f"vocab_size must be {get_encoding().n_vocab} to train with the GPT-2 tokenizer "
                            f"(the Parameters tab has {cfg.vocab_size:,}).")
            base = replace(TRAIN_PRESETS["one-minute"], name="the Parameters tab's configuration", cfg=cfg)
        elif choice in TRAIN_PRESETS:
            base = TRAIN_PRESETS[choice]
        else:
            raise error(f"Unknown configuration {choice!r}: choose one of {', '.join(c for _, c in CONFIG_CHOICES)}.")
        length = _whole("max_length", max_length, 2, base.cfg.context_length)
        return replace(base, num_epochs=_whole("epochs", epochs, 1, LIMITS["epochs"]), lr=_rate(lr),
                       batch_size=_whole("batch size", batch, 1, LIMITS["batch_size"]), max_length=length,
                       stride=_whole("stride", stride, 1, length))

    def check_memory(self, preset: TrainPreset) -> int:
        """The bytes a training of ``preset`` needs (within GPTVIZ_MAX_MODEL_BYTES, else a message)."""
        cfg, limit = preset.cfg, self.ctx.settings.max_model_bytes
        state = STATE_FACTOR * estimated_bytes(cfg, torch.float32)
        # one batch's activations, roughly: logits and their gradient, and per block a dozen (b, T, emb) tensors
        rows = preset.batch_size * preset.max_length
        acts = 4 * rows * (2 * cfg.vocab_size + cfg.n_layers * (12 * cfg.emb_dim + 2 * cfg.n_heads * preset.max_length))
        if state + acts > limit:
            raise error(f"Training {preset.name} needs about {(state + acts) / 1e9:.2f} GB (the weights, their "
                        f"gradients and AdamW's two moments, {STATE_FACTOR}× the weights, plus one batch); this app "
                        f"allows {limit / 1e9:.2f} GB (GPTVIZ_MAX_MODEL_BYTES). Choose a smaller configuration or "
                        "batch.")
        return state + acts

    # --------------------------------------------------------------- what the view shows
    def shown(self, run: TrainingRun, status: str) -> Trained:
        t = run.trainer
        figure = loss_figure(t.track_tokens_seen, t.train_losses, t.val_losses, tokens_per_epoch=run.tokens_per_epoch,
                             epochs=t.num_epochs)
        grads = grad_norm_figure(run.last.grad_norms) if run.last is not None else empty_figure(
            "The gradient reaching each block shows after the first step.", height=300)
        samples = "\n\n".join(f"after epoch {i + 1}: {s}" for i, s in enumerate(run.samples))
        return Trained(status, figure, grads, samples or "The sample continuation appears after each epoch.")

    @staticmethod
    def status(run: TrainingRun, state: str) -> str:
        r, t = run.last, run.trainer
        if r is None:
            return f"**{state}** · {run.what}: {t.total_steps} optimizer steps, {t.num_epochs} epochs."
        done = r.step + 1
        left = (time.monotonic() - run.started) / done * (r.total_steps - done)
        loss = f"train loss {t.train_losses[-1]:.3f}, val loss {t.val_losses[-1]:.3f}" if t.train_losses else ""
        return (f"**{state}** · {run.what} · step {done}/{r.total_steps} (epoch {r.epoch}) · {loss} · "
                f"{r.tokens_per_s:,.0f} tokens/s · about {left:.0f} s left · {r.tokens_seen:,} tokens seen")

    # --------------------------------------------------------------- Start, Pause, Stop
    def _new_run(self, v: Visitor, source: str, text: Any, file: Any, choice: str, fields: list[Any],
                 *numbers: Any) -> TrainingRun:
        preset = self.preset(choice, fields, *numbers)
        need = self.check_memory(preset)
        body, what_text = self.text(source, text, file)

        def replaced() -> None:  # the visitor's stopped or finished training (v.lock is held: start())
            v.training = None

        try:
            with self.ctx.memory.room(need, f"training {preset.name}", v, replaced if v.training else None):
                model, train_loader, val_loader = setup(preset, body)
                trainer = Trainer(model, train_loader, val_loader, lr=preset.lr, weight_decay=preset.weight_decay,
                                  device=self.ctx.device, num_epochs=preset.num_epochs, eval_freq=preset.eval_freq,
                                  eval_iter=preset.eval_iter, start_context=preset.start_context)
        except ValueError as e:
            raise error(f"Cannot train on {what_text}: {e}.") from None
        per_epoch = len(train_loader) * preset.batch_size * preset.max_length
        return TrainingRun(trainer, preset, f"{preset.name} on {what_text}", per_epoch)

    def start(self, source: str, text: Any, file: Any, choice: str, epochs: Any, lr: Any, batch: Any,
              max_length: Any, stride: Any, vocab_size: Any, context_length: Any, emb_dim: Any, n_heads: Any,
              n_layers: Any, drop_rate: Any, qkv_bias: Any, tie_weights: Any,
              request: gr.Request) -> Iterator[Trained]:
        """Start (or resume a paused) training; yields the view after every optimizer step. The
        last eight inputs are the Parameters tab's configuration (used when that is chosen)."""
        fields = [vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias, tie_weights]
        v = self.ctx.visitor(request)
        with v.lock:
            run = v.training
            if run is not None and run.active:
                raise error("You are training already: press Pause or Stop first.")
            if run is None or run.stopped or run.trainer.done:
                run = self._new_run(v, source, text, file, choice, fields, epochs, lr, batch, max_length, stride)
                v.training = run
            run.active = True
        try:
            yield from self._train(v, run)
        finally:
            run.active = False

    def _train(self, v: Visitor, run: TrainingRun) -> Iterator[Trained]:
        key, trainer = id(v), run.trainer
        trainer._stop.clear()
        try:
            while (place := self.line.place(key)) and not trainer._stop.is_set():
                yield Trained(f"**Waiting** · you are number {place} in line: {self.line.size} trainings run at once "
                              "on this server.", gr.skip(), gr.skip(), gr.skip())
                time.sleep(1.0)
            rows = max(1, SLICE_TOKENS // run.preset.max_length)
            while not trainer.done and not trainer._stop.is_set() and v.training is run:
                run.last = self._step_in_turns(trainer, rows)
                if run.last.sample is not None:
                    run.samples.append(run.last.sample)
                with self.ctx.turn.turn(Turns.TRAIN):  # the figures are drawn in a turn too (gptviz.ui.serving)
                    out = rendered(self.shown(run, self.status(run, "Training")))
                yield out
        finally:
            self.line.leave(key)
        state = "Done" if trainer.done else "Stopped" if run.stopped else "Paused"
        yield rendered(self.shown(run, self.status(run, state)))

    def _step_in_turns(self, trainer: Trainer, rows: int) -> TrainStep:
        """One optimizer step, a turn per slice (Trainer.step_in_slices): Steps run in between."""
        slices = trainer.step_in_slices(rows)
        while True:
            with self.ctx.turn.turn(Turns.TRAIN):
                try:
                    next(slices)
                except StopIteration as finished:
                    return finished.value

    def pause(self, request: gr.Request) -> str:
        run = self.ctx.visitor(request).training
        if run is None:
            raise error("Nothing is training: press Start first.")
        run.trainer.stop()
        return "**Pausing** after this step: press Start to go on."

    def stop(self, request: gr.Request) -> str:
        run = self.ctx.visitor(request).training
        if run is None:
            raise error("Nothing is training: press Start first.")
        run.stopped = True
        run.trainer.stop()
        return "**Stopping** after this step: the model stays here to explore or download."

    # --------------------------------------------------------------- the trained model
    def _finished(self, request: gr.Request) -> tuple[Visitor, TrainingRun]:
        v = self.ctx.visitor(request)
        run = v.training
        if run is None or run.last is None:
            raise error("Train a model first: press Start (one optimizer step is enough to explore it).")
        return v, run

    def trained_model(self, request: gr.Request) -> tuple[Visitor, ModelSpec, Any]:
        """The visitor's trained model as an eval-mode copy (training may go on) and its spec."""
        v, run = self._finished(request)
        with self.ctx.memory.room(estimated_bytes(run.preset.cfg, torch.float32), "a copy of your trained model", v,
                                  functools.partial(drop_own, v)), self.ctx.turn.turn(Turns.STEP):  # between two steps
            model = self.ctx.memory.track(copy.deepcopy(run.trainer.model).eval())
            loss = run.trainer.val_losses[-1] if run.trainer.val_losses else None
        name = f"{run.what}, {run.last.step + 1} steps" + (f", val loss {loss:.2f}" if loss is not None else "")
        return v, ModelSpec(TRAINED, model.cfg, "float32", name), model

    def download(self, request: gr.Request) -> str:
        """The book's checkpoint (model and optimizer state) of the visitor's training, as a file."""
        v, run = self._finished(request)
        out = Path(tempfile.mkdtemp(prefix="gptviz-train-")) / "model_and_optimizer.pth"
        with self.ctx.turn.turn(Turns.STEP):
            save_checkpoint(out, run.trainer.model, run.trainer.optimizer)
        return str(out)

    def autograd(self, request: gr.Request) -> tuple[pd.DataFrame, str]:
        """One batch of the visitor's model: its loss, and autograd's derivative of it for a few
        weights beside the central finite difference (float64 on both sides)."""
        v, run = self._finished(request)
        batch = next(iter(run.trainer.val_loader))
        batch = (batch[0][:1, :32], batch[1][:1, :32])  # one window's first 32 tokens: quick in float64
        with self.ctx.turn.turn(Turns.ANALYSIS):
            checks = gradient_check(run.trainer.model, batch, CHECKED_WEIGHTS, eps=1e-6)
        rows = [dict(weight=f"{c.name}{list(c.index)}", autograd=f"{c.autograd:.8g}", finite_difference=f"{c.numeric:.8g}",
                     agree="yes" if math.isclose(c.autograd, c.numeric, rel_tol=CHECK_TOLERANCE["rel"],
                                                 abs_tol=CHECK_TOLERANCE["abs"]) else "NO")
                for c in checks]
        note = ("Backpropagation's derivative of the loss with respect to each weight, beside "
                "(loss(w + ε) − loss(w − ε)) / 2ε with ε = 1e-6, both on a float64 copy in eval mode (dropout off): "
                f"they agree when within a relative {CHECK_TOLERANCE['rel']:g} (or {CHECK_TOLERANCE['abs']:g} absolute).")
        return pd.DataFrame(rows), note

    # --------------------------------------------------------------- layout and wiring
    def preset_fields(self, choice: str) -> tuple[Any, ...]:
        """A configuration chosen: its hyperparameters fill the fields (the Parameters tab's: one-minute's)."""
        p = TRAIN_PRESETS.get(choice, TRAIN_PRESETS["one-minute"])
        return p.num_epochs, p.lr, p.batch_size, p.max_length, p.stride

    def build(self) -> dict[str, Any]:
        c, first = self.c, TRAIN_PRESETS["one-minute"]
        gr.Markdown("Pretrain a GPT as the book's chapter 5 does: sliding windows over a text, the cross-entropy "
                    "loss of every next token, AdamW. You train your own copy; Steps of other visitors run between "
                    "your optimizer steps.", elem_id="train-intro")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                c["train_source"] = gr.Radio(TEXT_CHOICES, value=VERDICT, label="Text", elem_id="train-source")
                c["train_text"] = gr.Textbox(label="your text (or a .txt file below)", lines=4, elem_id="train-text")
                c["train_file"] = gr.File(label="a UTF-8 .txt file", file_types=[".txt"], type="filepath",
                                          elem_id="train-file")
                c["train_config"] = gr.Dropdown(CONFIG_CHOICES, value="one-minute", label="Configuration",
                                                elem_id="train-config")
                with gr.Row():
                    c["train_epochs"] = gr.Number(first.num_epochs, label="epochs", precision=None, elem_id="train-epochs")
                    c["train_lr"] = gr.Number(first.lr, label="learning rate", precision=None, elem_id="train-lr")
                    c["train_batch"] = gr.Number(first.batch_size, label="batch size", precision=None,
                                                 elem_id="train-batch")
                with gr.Row():
                    c["train_max_length"] = gr.Number(first.max_length, label="max_length", precision=None,
                                                      elem_id="train-max-length")
                    c["train_stride"] = gr.Number(first.stride, label="stride", precision=None, elem_id="train-stride")
                with gr.Row():
                    c["train_start"] = gr.Button("Start", variant="primary", elem_id="train-start")
                    c["train_pause"] = gr.Button("Pause", elem_id="train-pause")
                    c["train_stop"] = gr.Button("Stop", elem_id="train-stop")
                with gr.Row():
                    c["train_explore"] = gr.Button("Explore this model", elem_id="train-explore")
                    c["train_download"] = gr.DownloadButton("Download .pth", elem_id="train-download")
            with gr.Column(scale=3):
                c["train_status"] = gr.Markdown("Choose a text and a configuration, then press Start.",
                                                elem_id="train-status")
                c["train_loss"] = Plot(empty_figure("The loss appears at the first evaluation.", height=380),
                                       show_label=False, elem_id="train-loss")
                c["train_sample"] = gr.Textbox(label="Every effort moves you … (greedy, after each epoch)", lines=4,
                                               interactive=False, elem_id="train-sample")
                c["train_grads"] = Plot(empty_figure("The gradient reaching each block shows after the first step.",
                                                     height=300), show_label=False, elem_id="train-grads")
        with gr.Accordion("Autograd, checked: backpropagation against finite differences", open=False,
                          elem_id="autograd-acc"):
            c["autograd_btn"] = gr.Button("Check the gradients of one batch", elem_id="autograd-btn")
            c["autograd_note"] = gr.Markdown(elem_id="autograd-note")
            c["autograd_table"] = gr.Dataframe(interactive=False, elem_id="autograd-table")
        return c

    def wire(self, switch: Any, switched: list[Any], fields: list[Any]) -> None:
        """``switch(v, spec, own)`` makes a model the visitor's (the Model view's), filling ``switched``;
        ``fields``: the Parameters tab's eight configuration inputs."""
        c = self.c
        numbers = [c["train_epochs"], c["train_lr"], c["train_batch"], c["train_max_length"], c["train_stride"]]
        c["train_config"].input(self.preset_fields, c["train_config"], numbers, show_progress="hidden")
        inputs = [c["train_source"], c["train_text"], c["train_file"], c["train_config"], *numbers, *fields]
        trained = components(Trained, c)
        c["train_start"].click(self.start, inputs, trained, api_name="train", concurrency_id="train",
                               concurrency_limit=None, show_progress="hidden")
        c["train_pause"].click(self.pause, None, c["train_status"], api_name="train_pause", show_progress="hidden")
        c["train_stop"].click(self.stop, None, c["train_status"], api_name="train_stop", show_progress="hidden")
        c["train_download"].click(self.download, None, c["train_download"], api_name="train_download")
        c["autograd_btn"].click(self.autograd, None, [c["autograd_table"], c["autograd_note"]], api_name="autograd")

        def explore(request: gr.Request) -> Any:
            v, spec, model = self.trained_model(request)
            return switch(v, spec, model)

        c["train_explore"].click(explore, None, switched, api_name="train_explore")
