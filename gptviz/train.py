"""Pretraining as the book's chapter 5 does it, with its names: the data (``GPTDatasetV1``,
``create_dataloader_v1``, the character split), the losses and ``train_model_simple``. gptviz adds
:class:`Trainer` (the same loop one optimizer step at a time, for the app; the book's function runs
on it), :data:`TRAIN_PRESETS`, :func:`save_checkpoint`, :func:`gradient_check`, ``python -m gptviz.train``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
import sys
import threading
import time
from collections import namedtuple
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .config import GPTConfig
from .generation.session import generate_greedy  # the app's greedy generation: its one import here
from .model import GPTModel
from .settings import select_device
from .tokenizer import ENDOFTEXT, get_encoding

__all__ = ["GPTDatasetV1", "create_dataloader_v1", "split_text", "read_text", "calc_loss_batch", "calc_loss_loader",
           "evaluate_model", "initial_losses", "generate_sample", "train_model_simple",
           "TrainStep", "Trainer", "TrainPreset", "TRAIN_PRESETS", "setup", "save_checkpoint", "gradient_check"]

VERDICT_PATH = Path(__file__).resolve().parent.parent / "assets" / "the-verdict.txt"
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
SEED = 123  # the book's torch.manual_seed(123)


# --------------------------------------------------------------------------- data (chapter 2, 5.1.3)
class GPTDatasetV1(Dataset):
    """Windows of ``max_length`` token ids, ``stride`` apart; each target is its input shifted by one."""

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int) -> None:
        for name, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.input_ids, self.target_ids = [], []
        token_ids = tokenizer.encode(txt, allowed_special={ENDOFTEXT})
        if len(token_ids) <= max_length:
            n = len(token_ids)
            what = {0: "empty", 1: "a single token"}.get(n, f"{n} tokens long, shorter than one window")
            raise ValueError(f"the text is {what}: training needs at least max_length + 1 = {max_length + 1} "
                             "tokens (an input window and its targets, shifted by one)")  # fmt: skip
        for i in range(0, len(token_ids) - max_length, stride):
            input_chunk = token_ids[i : i + max_length]  # (max_length,)
            target_chunk = token_ids[i + 1 : i + max_length + 1]  # (max_length,): the next token of each
            self.input_ids.append(torch.tensor(input_chunk))
            self.target_ids.append(torch.tensor(target_chunk))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0) -> DataLoader:
    """The book's loader over :class:`GPTDatasetV1`, with gptviz's offline GPT-2 tokenizer."""
    tokenizer = get_encoding()
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)


def split_text(text: str, train_ratio: float = 0.90) -> tuple[str, str]:
    """The book's split by characters: the first ``train_ratio`` of ``text`` trains, the rest validates."""
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must lie between 0 and 1, got {train_ratio!r}")
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


def read_text(path: str | Path | None = None) -> str:
    """The training text (default: The Verdict from ``assets/``, its sha256 checked)."""
    path = Path(path) if path is not None else VERDICT_PATH
    data = path.read_bytes()
    if path == VERDICT_PATH and hashlib.sha256(data).hexdigest() != VERDICT_SHA256:
        raise RuntimeError(f"{path} is not the book's the-verdict.txt (sha256 differs from {VERDICT_SHA256})")
    return data.decode("utf-8")


# --------------------------------------------------------------------------- losses (5.1.2, 5.1.3)
def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: GPTModel, device) -> torch.Tensor:
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)  # (b, T) each
    logits = model(input_batch)  # (b, T, vocab)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())  # (b*T, vocab) vs (b*T,)


def calc_loss_loader(data_loader: DataLoader, model: GPTModel, device, num_batches: int | None = None) -> float:
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def initial_losses(model: GPTModel, train_loader: DataLoader, val_loader: DataLoader, device) -> tuple[float, float]:
    """The book's losses before training (5.1.3): eval mode, every batch, after ``manual_seed(123)``;
    the global random stream is left as it was, so training afterwards draws what the book's does."""
    device = torch.device(device)
    was_training = model.training
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(SEED)
        model.eval()
        with torch.no_grad():
            losses = calc_loss_loader(train_loader, model, device), calc_loss_loader(val_loader, model, device)
    model.train(was_training)
    return losses


def generate_sample(model: GPTModel, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> str:
    """The book's ``generate_and_print_sample`` without the print: the text of 50 greedy tokens more."""
    was_training = model.training
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = torch.tensor(tokenizer.encode(start_context, allowed_special={ENDOFTEXT})).unsqueeze(0)  # (1, T)
    token_ids = generate_greedy(model, encoded.to(device), max_new_tokens, context_size)  # (1, T + 50)
    model.train(was_training)
    return tokenizer.decode(token_ids.squeeze(0).tolist()).replace("\n", " ")


# --------------------------------------------------------------------------- the loop (5.2), step by step
@dataclass(frozen=True)
class TrainStep:
    """What one optimizer step did (:meth:`Trainer.step`)."""

    step: int  # the book's global_step, from 0
    epoch: int  # from 1, as the book prints it
    batch: int  # from 1, within the epoch
    batches_per_epoch: int
    total_steps: int
    tokens_seen: int  # input tokens trained on so far, this step's included
    loss: float  # this batch's loss before the update (train mode: dropout on)
    lr: float
    seconds: float  # forward, backward and update (evaluation and sample not counted)
    tokens_per_s: float
    grad_norms: tuple[float, ...]  # L2 norm of each transformer block's gradient (before the update)
    train_loss: float | None = None  # evaluate_model's, every eval_freq steps
    val_loss: float | None = None
    sample: str | None = None  # after the epoch's last step

    @property
    def evaluated(self) -> bool:
        return self.train_loss is not None


def _rng_states(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_states(device: torch.device, states: tuple) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _check_positive(name: str, value: object, integer: bool = False) -> None:
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def block_grad_norms(model: GPTModel) -> tuple[float, ...]:
    """The L2 norm of the gradient of each transformer block's parameters."""
    norms = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in block.parameters() if p.grad is not None]))
             for block in model.trf_blocks]  # fmt: skip
    return tuple(torch.stack(norms).tolist()) if norms else ()


class Trainer:
    """The book's training loop one optimizer step at a time.

    Without ``optimizer`` it trains a copy of ``model`` (on ``device``) with a new AdamW of ``lr`` and
    ``weight_decay``: the model passed in never changes. With ``optimizer`` (over ``model``'s parameters)
    it trains ``model`` itself, as ``train_model_simple`` does. :meth:`run` yields a :class:`TrainStep`
    per step until the epochs are done or :meth:`stop` is called; calling it again resumes."""

    def __init__(self, model: GPTModel, train_loader: DataLoader, val_loader: DataLoader, *,
                 optimizer: torch.optim.Optimizer | None = None, lr: float = 0.0004, weight_decay: float = 0.1,
                 device: torch.device | str | None = None, num_epochs: int = 10, eval_freq: int = 5,
                 eval_iter: int = 5, start_context: str = "Every effort moves you", tokenizer=None) -> None:
        device = torch.device(device) if device is not None else select_device()
        if optimizer is None:
            _check_positive("the learning rate", lr)
            model = copy.deepcopy(model).to(device)  # (deepcopy draws no random numbers)
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        for group in optimizer.param_groups:
            _check_positive("the learning rate", group["lr"])
        for name, value in (("num_epochs", num_epochs), ("eval_freq", eval_freq), ("eval_iter", eval_iter)):
            _check_positive(name, value, integer=True)
        for name, loader in (("training", train_loader), ("validation", val_loader)):
            if len(loader) == 0:
                raise ValueError(f"the {name} loader has no batches: its text is shorter than one batch of windows")
        if not start_context:
            raise ValueError("start_context is empty: the sample after each epoch needs at least one token")
        self.model, self.optimizer, self.device = model, optimizer, device
        self.train_loader, self.val_loader = train_loader, val_loader
        self.num_epochs, self.eval_freq, self.eval_iter = num_epochs, eval_freq, eval_iter
        self.start_context, self.tokenizer = start_context, tokenizer or get_encoding()
        self.train_losses, self.val_losses, self.track_tokens_seen = [], [], []  # the book's three lists
        self.tokens_seen, self.global_step, self.epoch = 0, -1, 0
        self._batches: Iterator | None = None  # this epoch's iterator over train_loader
        self._batch = 0  # batches taken from it
        self.rng_states = _rng_states(device)  # the trainer's own random stream (see _own_random_stream)
        self._stop = threading.Event()

    @property
    def total_steps(self) -> int:
        return self.num_epochs * len(self.train_loader)

    @property
    def done(self) -> bool:
        return self.global_step + 1 >= self.total_steps

    def stop(self) -> None:
        """Ask :meth:`run` to return after the step in progress (safe from another thread)."""
        self._stop.set()

    def run(self, max_steps: int | None = None) -> Iterator[TrainStep]:
        """Steps until done, :meth:`stop`, or ``max_steps`` more; call again to resume."""
        self._stop.clear()
        taken = 0
        while not self.done and not self._stop.is_set() and (max_steps is None or taken < max_steps):
            yield self.step()
            taken += 1

    def step(self) -> TrainStep:
        """One optimizer step; evaluation every ``eval_freq`` steps and a sample after each epoch."""
        if self.done:
            raise RuntimeError(f"training is finished: all {self.num_epochs} epochs ran")
        with self._own_random_stream():
            if self._batches is None:  # the book's `for input_batch, target_batch in train_loader:`
                self.epoch, self._batch = self.epoch + 1, 0
                self._batches = iter(self.train_loader)
            input_batch, target_batch = next(self._batches)  # (b, T) each
            self._batch += 1
            start = time.perf_counter()
            self.model.train()
            self.optimizer.zero_grad()  # reset the gradients of the previous batch
            loss = calc_loss_batch(input_batch, target_batch, self.model, self.device)
            loss.backward()  # the gradients
            norms = block_grad_norms(self.model)
            self.optimizer.step()  # update the weights with them
            loss = loss.item()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            self.tokens_seen += input_batch.numel()
            self.global_step += 1
            train_loss = val_loss = sample = None
            if self.global_step % self.eval_freq == 0:  # the book's optional evaluation step
                train_loss, val_loss = evaluate_model(self.model, self.train_loader, self.val_loader, self.device,
                                                      self.eval_iter)  # fmt: skip
                self.train_losses.append(train_loss)
                self.val_losses.append(val_loss)
                self.track_tokens_seen.append(self.tokens_seen)
            if self._batch == len(self.train_loader):  # the epoch's last batch
                self._batches = None
                sample = generate_sample(self.model, self.tokenizer, self.device, self.start_context)
        return TrainStep(self.global_step, self.epoch, self._batch, len(self.train_loader), self.total_steps,
                         self.tokens_seen, loss, float(self.optimizer.param_groups[0]["lr"]), seconds,
                         input_batch.numel() / seconds, norms, train_loss, val_loss, sample)  # fmt: skip

    @contextlib.contextmanager
    def _own_random_stream(self) -> Iterator[None]:
        """Dropout masks and the loaders' shuffles draw from the trainer's own stream (the global
        generator's state when it was made), swapped in for a step and out again: a stopped trainer
        resumes with the numbers an uninterrupted run draws, whatever ran in between."""
        outer = _rng_states(self.device)
        _set_rng_states(self.device, self.rng_states)
        try:
            yield
        finally:
            self.rng_states = _rng_states(self.device)
            _set_rng_states(self.device, outer)


def _print_step(record: TrainStep) -> None:
    if record.evaluated:
        print(f"Ep {record.epoch} (Step {record.step:06d}): "
              f"Train loss {record.train_loss:.3f}, Val loss {record.val_loss:.3f}", flush=True)  # fmt: skip
    if record.sample is not None:
        print(record.sample, flush=True)


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer):  # fmt: skip
    """The book's loop (5.2): trains ``model`` in place; returns (train_losses, val_losses, track_tokens_seen)."""
    trainer = Trainer(model, train_loader, val_loader, optimizer=optimizer, device=device, num_epochs=num_epochs,
                      eval_freq=eval_freq, eval_iter=eval_iter, start_context=start_context, tokenizer=tokenizer)
    for record in trainer.run():
        _print_step(record)
    _set_rng_states(trainer.device, trainer.rng_states)  # the global generator ends where the book's loop does
    return trainer.train_losses, trainer.val_losses, trainer.track_tokens_seen


# --------------------------------------------------------------------------- presets and setup
@dataclass(frozen=True)
class TrainPreset:
    name: str
    cfg: GPTConfig
    lr: float
    weight_decay: float
    batch_size: int
    max_length: int
    stride: int
    num_epochs: int
    eval_freq: int
    eval_iter: int
    start_context: str = "Every effort moves you"
    train_ratio: float = 0.90


TRAIN_PRESETS: dict[str, TrainPreset] = {p.name: p for p in (
    # The book's 5.2 run: GPT_CONFIG_124M with context_length 256.
    TrainPreset("book-ch05", GPTConfig(context_length=256, drop_rate=0.1, qkv_bias=False), lr=0.0004,
                weight_decay=0.1, batch_size=2, max_length=256, stride=256, num_epochs=10, eval_freq=5, eval_iter=5),
    # About a minute on 2 CPU cores; the 50,257-wide output head is most of a step.
    TrainPreset("one-minute", GPTConfig(context_length=128, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.1),
                lr=0.002, weight_decay=0.1, batch_size=8, max_length=128, stride=128, num_epochs=8, eval_freq=4,
                eval_iter=5),  # 4 steps an epoch: one evaluation each
)}  # fmt: skip


def setup(preset: TrainPreset, text: str) -> tuple[GPTModel, DataLoader, DataLoader]:
    """The book's setup: the split, ``manual_seed(123)`` then the loaders (5.1.3), ``manual_seed(123)``
    then the model (5.2); training starts from the random state the book's does."""
    if preset.max_length > preset.cfg.context_length:
        raise ValueError(f"max_length={preset.max_length} exceeds context_length={preset.cfg.context_length}")
    train_data, val_data = split_text(text, preset.train_ratio)
    torch.manual_seed(SEED)
    loaders = []
    for part, data, train in (("training", train_data, True), ("validation", val_data, False)):
        try:
            loaders.append(create_dataloader_v1(data, batch_size=preset.batch_size, max_length=preset.max_length,
                                                stride=preset.stride, drop_last=train, shuffle=train))  # fmt: skip
        except ValueError as e:
            raise ValueError(f"the {part} part of the text ({len(data):,} characters): {e}") from None
    torch.manual_seed(SEED)
    return GPTModel(preset.cfg), loaders[0], loaders[1]


def save_checkpoint(path: str | Path, model: GPTModel, optimizer: torch.optim.Optimizer) -> None:
    """The book's checkpoint (5.4): model and AdamW state, readable by :func:`~gptviz.files.weights.load_pretrained`."""
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)


# --------------------------------------------------------------------------- autograd against finite differences
#: One weight's derivative of the loss: by backpropagation and by (loss(w + eps) - loss(w - eps)) / (2 eps).
GradientCheck = namedtuple("GradientCheck", "name index autograd numeric")


def gradient_check(model: GPTModel, batch: tuple[torch.Tensor, torch.Tensor],
                   params: Sequence[tuple[str, tuple[int, ...]]], eps: float = 1e-6) -> list[GradientCheck]:
    """For each ``(parameter name, index)``: autograd's derivative of the batch loss beside the
    central difference, both on a float64 copy of ``model`` in eval mode (dropout off, so the
    loss is one fixed function of the weights). ``model`` itself is left untouched."""
    check = copy.deepcopy(model).double().eval()
    check.zero_grad(set_to_none=True)
    named = dict(check.named_parameters())

    def loss() -> torch.Tensor:
        return calc_loss_batch(*batch, check, check.device)  # batch: (b, T) inputs, (b, T) targets

    loss().backward()
    results = []
    with torch.no_grad():
        for name, index in params:
            p, index = named[name], tuple(index)
            w, shifted = p[index].item(), []
            for value in (w + eps, w - eps):
                p[index] = value
                shifted.append(loss().item())
            p[index] = w
            results.append(GradientCheck(name, index, p.grad[index].item(), (shifted[0] - shifted[1]) / (2 * eps)))
    return results


# --------------------------------------------------------------------------- python -m gptviz.train
def _progress(r: TrainStep, start: float) -> str:
    done = r.step + 1
    eta = (time.perf_counter() - start) / done * (r.total_steps - done)
    return (f"[{'#' * (24 * done // r.total_steps):<24}] step {done}/{r.total_steps} ep {r.epoch} "
            f"loss {r.loss:.3f} {r.seconds:.2f} s/step {r.tokens_per_s:,.0f} tok/s eta {eta:.0f} s")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptviz.train", description="Pretrain as the book's chapter 5.")
    parser.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="book-ch05")
    parser.add_argument("--epochs", type=int, help="number of epochs (default: the preset's)")
    parser.add_argument("--text", type=Path, help="training text, UTF-8 (default: assets/the-verdict.txt)")
    parser.add_argument("--out", type=Path, help="write the model and optimizer here (.pth)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: GPTVIZ_DEVICE, else the GPU when present)")
    args = parser.parse_args(argv)
    preset = replace(TRAIN_PRESETS[args.preset], **({} if args.epochs is None else {"num_epochs": args.epochs}))
    device = select_device(args.device)
    try:
        _check_positive("--epochs", preset.num_epochs, integer=True)
        model, train_loader, val_loader = setup(preset, read_text(args.text))
    except ValueError as e:
        parser.error(str(e))
    model.to(device)
    train_loss, val_loss = initial_losses(model, train_loader, val_loader, device)
    print(f"Training loss: {train_loss:.14f}\nValidation loss: {val_loss:.14f}", flush=True)
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    trainer = Trainer(model, train_loader, val_loader, optimizer=optimizer, device=device, num_epochs=preset.num_epochs,
                      eval_freq=preset.eval_freq, eval_iter=preset.eval_iter, start_context=preset.start_context)
    tty = sys.stderr.isatty()  # a progress line on stderr: redrawn on a terminal, one per step elsewhere
    clear, end = ("\r\033[K", "") if tty else ("", "\n")
    for record in trainer.run():
        sys.stderr.write(clear)
        _print_step(record)
        sys.stderr.write(clear + _progress(record, start) + end)
        sys.stderr.flush()
    sys.stderr.write(clear)
    print(f"Training completed in {(time.perf_counter() - start) / 60:.2f} minutes.", flush=True)
    if args.out is not None:
        save_checkpoint(args.out, model, optimizer)
        print(f"Saved {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
