"""Training presets (the book's chapter-5 run, and one that trains in about a minute on 2 CPU
cores), the book's setup (seeds, split, loaders, model) and its checkpoint format (5.4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import GPTConfig
from ..model import GPTModel
from .data import SEED, create_dataloader_v1, split_text

__all__ = ["TrainPreset", "TRAIN_PRESETS", "setup", "save_checkpoint"]


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
