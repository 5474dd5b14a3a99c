"""Token ids as model input, checked once for every analysis: the model in eval mode (dropout
off), one sequence of ids inside the vocabulary, cropped to the last ``context_length`` tokens
as generation crops them."""

from __future__ import annotations

from typing import Sequence

import torch

from .model import GPTModel

__all__ = ["TokenIds", "require_eval", "as_batch"]

TokenIds = Sequence[int] | torch.Tensor


def require_eval(model: GPTModel) -> None:
    """ValueError unless ``model`` is in eval mode; nothing in gptviz switches a shared model's mode."""
    if model.training:
        raise ValueError("the model is in training mode (dropout is active): call model.eval() once after "
                         "building it; gptviz never switches a shared model's mode")


def as_batch(model: GPTModel, ids: TokenIds) -> torch.Tensor:
    """Token ids as a ``(1, T)`` batch on the model's device, cropped to the last
    ``context_length`` tokens; refuses a model in training mode, an empty or batched input and ids
    outside the vocabulary."""
    require_eval(model)
    seq = torch.as_tensor(ids, dtype=torch.long)
    seq = seq[0] if seq.dim() == 2 and seq.shape[0] == 1 else seq
    if seq.dim() != 1:
        raise ValueError(f"ids must be one sequence of token ids, got shape {tuple(seq.shape)}")
    if not len(seq):
        raise ValueError("no tokens: enter some text first")
    vocab = model.cfg.vocab_size
    if int(seq.min()) < 0 or int(seq.max()) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}); got {int(seq.min())}..{int(seq.max())}")
    return seq[-model.cfg.context_length :].unsqueeze(0).to(model.device)  # (1, T)
