"""The book's training loop (5.2) one optimizer step at a time: :class:`Trainer` (for the app,
which runs a step as short slices between other visitors' Steps) and ``train_model_simple``
(the book's function, running on it)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import Generator, Iterator

import torch
from torch.utils.data import DataLoader

from ..model import GPTModel
from ..settings import select_device
from ..tokenizer import get_encoding
from .data import calc_loss_batch, generate_sample

__all__ = ["TrainStep", "Trainer", "train_model_simple", "block_grad_norms"]


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


def _chunks(inputs: torch.Tensor, targets: torch.Tensor, rows: int | None) -> Iterator[tuple]:
    """``(inputs, targets, share)`` ``rows`` rows at a time (the whole batch if ``rows`` is None),
    ``share`` = the chunk's fraction of the batch (its weight in the batch's mean loss)."""
    b = inputs.shape[0]
    step = b if rows is None else max(1, rows)
    for i in range(0, b, step):
        yield inputs[i:i + step], targets[i:i + step], 1 if step >= b else min(step, b - i) / b


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
        slices = self.step_in_slices()
        while True:
            try:
                next(slices)
            except StopIteration as finished:
                return finished.value

    def step_in_slices(self, rows: int | None = None) -> Generator[None, None, TrainStep]:
        """:meth:`step` as short pieces of work: it yields between them, and returns the step's record.

        With ``rows=None`` a piece is the book's whole batch (forward, backward and update), then each
        evaluation batch, then the sample: the same numbers as :meth:`step`. With ``rows=r``
        (OPTIMISATION for a shared server, where other visitors' Steps run between the pieces) the
        batch's forward and backward go ``r`` rows at a time, each chunk's mean loss weighted by its
        share of the batch, so the gradients add up to the whole batch's mean-loss gradient (equal up
        to float rounding; dropout masks are drawn per chunk, so with dropout on they differ as two
        draws do); evaluation batches are read ``r`` rows at a time likewise."""
        if self.done:
            raise RuntimeError(f"training is finished: all {self.num_epochs} epochs ran")
        with self._own_random_stream():
            if self._batches is None:  # the book's `for input_batch, target_batch in train_loader:`
                self.epoch, self._batch = self.epoch + 1, 0
                self._batches = iter(self.train_loader)
            input_batch, target_batch = next(self._batches)  # (b, T) each
            self._batch += 1
            self.model.train()
            self.optimizer.zero_grad()  # reset the gradients of the previous batch
        seconds, loss = 0.0, 0.0
        for inputs, targets, share in _chunks(input_batch, target_batch, rows):
            with self._own_random_stream():
                start = time.perf_counter()
                chunk_loss = calc_loss_batch(inputs, targets, self.model, self.device)
                (chunk_loss * share if share != 1 else chunk_loss).backward()  # the gradients
                loss += chunk_loss.item() * share
                seconds += time.perf_counter() - start
            yield
        with self._own_random_stream():
            start = time.perf_counter()
            norms = block_grad_norms(self.model)
            self.optimizer.step()  # update the weights with them
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds += time.perf_counter() - start
            self.tokens_seen += input_batch.numel()
            self.global_step += 1
        train_loss = val_loss = sample = None
        if self.global_step % self.eval_freq == 0:  # the book's optional evaluation step
            train_loss, val_loss = yield from self._evaluate_in_slices(rows)
            self.train_losses.append(train_loss)
            self.val_losses.append(val_loss)
            self.track_tokens_seen.append(self.tokens_seen)
        if self._batch == len(self.train_loader):  # the epoch's last batch
            self._batches = None
            yield
            with self._own_random_stream():
                sample = generate_sample(self.model, self.tokenizer, self.device, self.start_context)
        return TrainStep(self.global_step, self.epoch, self._batch, len(self.train_loader), self.total_steps,
                         self.tokens_seen, loss, float(self.optimizer.param_groups[0]["lr"]), seconds,
                         input_batch.numel() / seconds, norms, train_loss, val_loss, sample)  # fmt: skip

    def _evaluate_in_slices(self, rows: int | None) -> Generator[None, None, tuple[float, float]]:
        """``evaluate_model`` a batch (or ``rows`` rows) at a time: with ``rows=None`` its very numbers."""
        losses = []
        self.model.eval()
        for loader in (self.train_loader, self.val_loader):  # calc_loss_loader(..., num_batches=eval_iter)
            total, n = 0.0, min(self.eval_iter, len(loader))
            with self._own_random_stream():  # a shuffled loader draws its order from the stream
                batches = list(itertools.islice(loader, n))
            for input_batch, target_batch in batches:
                batch_loss = 0.0
                for inputs, targets, share in _chunks(input_batch, target_batch, rows):
                    yield
                    with self._own_random_stream(), torch.no_grad():
                        batch_loss += calc_loss_batch(inputs, targets, self.model, self.device).item() * share
                total += batch_loss
            losses.append(total / n)
        self.model.train()
        return losses[0], losses[1]

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
