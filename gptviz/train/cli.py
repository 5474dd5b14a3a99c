"""``python -m gptviz.train``: the book's chapter-5 run on the terminal, its lines and a progress bar."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from ..settings import select_device
from .data import initial_losses, read_text
from .loop import Trainer, TrainStep, _check_positive, _print_step
from .presets import TRAIN_PRESETS, save_checkpoint, setup

__all__ = ["main"]


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
