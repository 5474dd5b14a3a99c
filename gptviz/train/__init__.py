"""Pretraining as the book's chapter 5 does it, with its names: the data (``GPTDatasetV1``,
``create_dataloader_v1``, the character split), the losses and ``train_model_simple``
(:mod:`.data`, :mod:`.loop`). gptviz adds :class:`Trainer` (the same loop one optimizer step at a
time, in slices for the app; the book's function runs on it), :data:`TRAIN_PRESETS`,
:func:`save_checkpoint` (:mod:`.presets`) and ``python -m gptviz.train`` (:mod:`.cli`). The
autograd check is :mod:`gptviz.analysis.autograd`.
"""

from .cli import main
from .data import (SEED, VERDICT_PATH, VERDICT_SHA256, GPTDatasetV1, calc_loss_batch, calc_loss_loader, create_dataloader_v1,
                   evaluate_model, generate_sample, initial_losses, read_text, split_text)
from .loop import Trainer, TrainStep, block_grad_norms, train_model_simple
from .presets import TRAIN_PRESETS, TrainPreset, save_checkpoint, setup

__all__ = ["GPTDatasetV1", "create_dataloader_v1", "split_text", "read_text", "calc_loss_batch", "calc_loss_loader",
           "evaluate_model", "initial_losses", "generate_sample", "train_model_simple", "block_grad_norms",
           "TrainStep", "Trainer", "TrainPreset", "TRAIN_PRESETS", "setup", "save_checkpoint", "main",
           "VERDICT_PATH", "VERDICT_SHA256", "SEED"]
