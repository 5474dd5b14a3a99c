"""Autograd made visible (the book's appendix A.3-A.4): backpropagation's derivative of the loss
for chosen weights beside a finite-difference estimate, on one batch (the Train view's table)."""

from __future__ import annotations

import copy
from collections import namedtuple
from typing import Sequence

import torch

from ..model import GPTModel
from ..train import calc_loss_batch

__all__ = ["GradientCheck", "gradient_check"]

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
